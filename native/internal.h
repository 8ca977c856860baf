/* internal.h - the segment's layout and the engine's private helpers.
 *
 * Everything inside the segment is addressed by offset, never by pointer: processes map
 * it at different addresses.  Items are referenced by "refs" (byte offset / 8, 32 bits,
 * so a segment may be up to 32 GiB); ref 0 is null because offset 0 is the header.
 *
 * Lock order (never acquire against it; go the other way only with trylock):
 *     slot table -> index stripe -> size class -> page pool -> journal
 * A lock found EOWNERDEAD is made consistent, the segment is flagged needs_repair, the
 * operation unwinds every lock it holds and runs seg_repair() (which takes all locks in
 * order and rebuilds every derived structure from the index and the item headers), then
 * retries.  Nothing here calls Python, allocates outside the segment or does I/O while a
 * segment lock is held.
 */
#ifndef SHMCACHE_INTERNAL_H
#define SHMCACHE_INTERNAL_H

#include <errno.h>
#include <stddef.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>

#include "shmcache.h"

#define SEG_MAGIC          0x3148434143484d53ULL   /* "SMHCACH1" little-endian */
#define SEG_LAYOUT_VERSION 2u  /* 2: journal records carry at_us */
#define SEG_HEADER_BYTES   4096u
#define CACHELINE          64u

#define PINS_PER_SLOT      256u
#define MAX_STRIPES        1024u    /* see config_effective(): robust-list limit */
#define MAX_CHAIN_STEPS    100000u  /* a longer chain means a cycle: corruption */
#define EVICT_TRIES        64u      /* victims examined per allocation attempt */

/* Item states (low nibble of item.state); bit 0x10 = queue 1 (S3-FIFO main). */
#define IT_FREE      0x00
#define IT_RESERVED  0x01   /* allocated, being written by owner slot, not indexed */
#define IT_LINKED    0x02   /* in the index and in its class's policy queue        */
#define IT_ZOMBIE    0x03   /* removed while pinned; freed by the last unpin       */
#define IT_STATE_MASK 0x0f
#define IT_QUEUE1    0x10
#define IT_MARK      0x80   /* scratch bit used by repair/verify only              */
#define IT_SEEN      0x40   /* scratch bit used by verify only                     */
#define IT_SCRATCH   (IT_MARK | IT_SEEN)

/* Page map codes. */
#define PG_FREE      0xff
#define PG_LARGE_CONT 0xfe  /* continuation of a large-value run                  */
/* A slab page holds its class id (< nslab); a large run's head holds nslab.      */

#define LOCK_REPAIR  1      /* lock acquired but the segment needs repair          */
#define SHM_EREPAIR  -100   /* internal: unwind, repair, retry                     */

#if defined(__GNUC__)
#define LIKELY(x)   __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)
#define HIDDEN __attribute__((visibility("hidden")))
#define ALIGNED(n) __attribute__((aligned(n)))
#else
#define LIKELY(x) (x)
#define UNLIKELY(x) (x)
#define HIDDEN
#define ALIGNED(n)
#endif

#define LOAD(p)      __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define LOAD_RLX(p)  __atomic_load_n((p), __ATOMIC_RELAXED)
#define STORE(p, v)  __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define STORE_RLX(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define ADD_RLX(p, v) __atomic_fetch_add((p), (v), __ATOMIC_RELAXED)

typedef uint32_t ref_t;

/* A process-shared robust mutex plus who holds it (for diagnostics only). */
typedef struct shm_lock {
    pthread_mutex_t m;
    int32_t holder_pid;
    uint32_t id;            /* what this lock guards, for messages                 */
} ALIGNED(CACHELINE) shm_lock;

/* The header of every cached entry; key bytes then value bytes follow. */
typedef struct item {
    ref_t    hnext;         /* next item in the index chain                        */
    ref_t    prev, next;    /* policy queue links; free list uses next             */
    uint32_t vlen;
    uint64_t version;
    int64_t  expire_ms;     /* 0 = never                                           */
    uint32_t csum;          /* checksum of klen, vlen, key and value               */
    uint16_t klen;
    uint16_t flags;         /* caller-defined                                      */
    uint16_t pins;          /* zero-copy readers holding it                        */
    uint8_t  state;         /* IT_* | IT_QUEUE1 | IT_MARK                          */
    uint8_t  freq;          /* policy access bits, written without a lock          */
    uint8_t  cls;           /* size class (nslab = large run)                      */
    uint8_t  spare;
    uint16_t owner;         /* slot that reserved it (valid while IT_RESERVED)     */
} item;
_Static_assert(sizeof(item) == 48, "item header must stay 48 bytes");

static inline const char *item_key(const item *it) { return (const char *)(it + 1); }
static inline char *item_val(item *it) { return (char *)(it + 1) + it->klen; }

/* One entry of the page map. */
typedef struct page {
    uint8_t  cls;           /* PG_FREE, PG_LARGE_CONT, a slab class, or nslab      */
    uint8_t  pad;
    uint16_t nfree;         /* free chunks (slab pages)                            */
    ref_t    freelist;      /* first free chunk (slab pages)                       */
    uint32_t next, prev;    /* class partial-page list (page index + 1)            */
    uint32_t run;           /* large run: pages in the run (head only)             */
    uint32_t pad2;
} page;

typedef struct queue {
    ref_t head, tail;       /* head = newest                                       */
    uint64_t count;
} queue;

/* One size class (or the large-value class, index nslab). */
typedef struct sclass {
    shm_lock lock;
    uint32_t chunk;         /* chunk bytes; 0 for the large class                  */
    uint32_t per_page;
    uint32_t partial;       /* first page with free chunks (page index + 1)        */
    uint32_t pages;
    uint64_t entries;
    uint64_t used_bytes;    /* chunk bytes of live entries                         */
    uint64_t payload_bytes; /* header+key+value bytes of live entries              */
    uint64_t free_chunks;
    queue    q[2];          /* S3-FIFO: small, main; others use q[0]               */
    ref_t    hand;          /* SIEVE hand                                          */
    uint32_t full;          /* S3-FIFO: evicted since it last gained a page        */
    uint64_t evictions;
    uint64_t pressure;      /* evictions since the class last gained a page        */
} ALIGNED(CACHELINE) sclass;

typedef struct slot {
    shm_lock live;          /* held for life by the attaching thread               */
    int32_t  pid;
    uint32_t state;         /* 0 free, 1 live                                      */
    uint64_t generation;
    int64_t  attached_ms;
    uint64_t starttime;     /* /proc/<pid>/stat starttime: defeats PID reuse       */
    shm_counters ctr ALIGNED(CACHELINE);
    ref_t    pins[PINS_PER_SLOT] ALIGNED(CACHELINE);
} ALIGNED(CACHELINE) slot;

typedef struct journal {
    shm_lock lock;
    uint64_t head, tail;    /* byte positions, head - tail <= cap                  */
    uint64_t cap;
    uint64_t records, dropped;
} ALIGNED(CACHELINE) journal;

typedef struct seg_header {
    /* immutable after creation (covered by hdr_csum) */
    uint64_t magic;
    uint32_t layout_version;
    uint32_t header_bytes;
    uint64_t abi_hash;
    uint64_t size_bytes;
    uint64_t generation;
    int64_t  created_ms;
    shm_config cfg;
    uint64_t off_slots, off_stripes, off_classes, off_pool, off_journal, off_jdata,
             off_ghost, off_buckets, off_pages, off_data;
    uint64_t nbuckets, npages, nghost;
    uint32_t nslab, slot_bytes;
    uint32_t class_size[SHM_MAX_CLASSES];
    uint64_t hdr_csum;
    /* mutable */
    uint32_t ready ALIGNED(CACHELINE);
    uint32_t clean;
    uint32_t needs_repair;
    uint32_t pad0;
    shm_lock slot_lock;
    uint64_t version_ctr ALIGNED(CACHELINE);
    uint64_t entries ALIGNED(CACHELINE);
    shm_counters retired ALIGNED(CACHELINE);   /* counters of closed/reaped slots */
    uint64_t repairs;
} seg_header;

typedef struct pool {
    shm_lock lock;
    uint64_t free_pages;
    uint64_t hint;          /* where the next free-page search starts              */
} ALIGNED(CACHELINE) pool;

/* The process-local handle.  Layout values are copied out of the header once, at
 * attach, so later damage to the header cannot steer the engine out of bounds. */
struct shm_cache {
    uint8_t  *base;
    uint64_t  size;
    seg_header *hdr;
    slot     *slots;
    shm_lock *stripes;
    sclass   *classes;
    pool     *pool;
    journal  *jr;
    uint8_t  *jdata;
    uint16_t *ghost;         /* nghost buckets x 8 tags                          */
    uint8_t  *ghost_cursor;  /* per bucket: next slot to overwrite              */
    ref_t    *buckets;
    page     *pages;
    uint64_t  data_off, data_end, npages, nbuckets, bucket_mask, nghost, jcap;
    uint32_t  nstripes, nslab, page_bytes, page_shift, max_slots, max_key_len;
    uint32_t  policy, lock_timeout_ms;
    int       verify_reads;
    uint64_t  max_value_len, max_entries;
    shm_config cfg;
    uint32_t  class_size[SHM_MAX_CLASSES];
    int       slot_id;       /* -1 when none could be claimed                      */
    shm_counters *ctr;       /* this process's counters (or a local sink)          */
    shm_counters  sink;
    int64_t   fixed_clock;
    pid_t     pid;
    struct shm_cache *next_handle;
};

/* ---- errors (segment.c) ---- */
HIDDEN int  seg_err(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
HIDDEN int64_t seg_now(shm_cache *c);
HIDDEN uint64_t seg_next_version(shm_cache *c);

/* ---- hashing (hash.c) ---- */
HIDDEN uint64_t hash_bytes(const void *p, uint64_t len, uint64_t seed);
HIDDEN uint32_t hash_item_csum(const item *it);

/* ---- locks (lock.c) ---- */
HIDDEN int  lock_init(shm_lock *l, uint32_t id);
/* 0, LOCK_REPAIR (acquired; segment needs repair) or SHM_ETIMEDOUT / SHM_ECORRUPT. */
HIDDEN int  lock_acquire(shm_cache *c, shm_lock *l, const char *what);
HIDDEN int  lock_try(shm_cache *c, shm_lock *l);   /* 0 acquired, else busy        */
HIDDEN void lock_release(shm_lock *l);
/* The mutex's bytes are not what pthread_mutex_init made (scribbled memory). */
HIDDEN int  lock_damaged(shm_lock *l);

/* ---- refs and bounds ---- */
static inline item *ref_item(shm_cache *c, ref_t r) {
    uint64_t off = (uint64_t)r << 3;
    if (UNLIKELY(off < c->data_off || off + sizeof(item) > c->data_end)) return NULL;
    return (item *)(c->base + off);
}
static inline ref_t item_ref(shm_cache *c, const item *it) {
    return (ref_t)(((const uint8_t *)it - c->base) >> 3);
}
/* Header fields that decide memory accesses stay inside the data area. */
static inline int item_sane(shm_cache *c, const item *it) {
    uint64_t off = (uint64_t)((const uint8_t *)it - c->base);
    return off + sizeof(item) + it->klen + (uint64_t)it->vlen <= c->data_end;
}
static inline uint64_t item_total(const item *it) {
    return sizeof(item) + it->klen + (uint64_t)it->vlen;
}
static inline uint64_t page_index(shm_cache *c, const void *p) {
    return ((uint64_t)((const uint8_t *)p - c->base) - c->data_off) >> c->page_shift;
}
static inline uint8_t *page_addr(shm_cache *c, uint64_t idx) {
    return c->base + c->data_off + (idx << c->page_shift);
}
static inline uint32_t stripe_of(shm_cache *c, uint64_t h) {
    return (uint32_t)(h & c->bucket_mask) & (c->nstripes - 1);
}
static inline int expired(const item *it, int64_t now) {
    return it->expire_ms != 0 && it->expire_ms <= now;
}

/* ---- slab allocator (slab.c) ---- */
HIDDEN int   slab_class_for(shm_cache *c, uint64_t total);      /* class or nslab  */
HIDDEN item *slab_alloc(shm_cache *c, uint64_t total, int *err); /* IT_RESERVED    */
HIDDEN void  slab_free_locked(shm_cache *c, sclass *k, item *it);/* class lock held */
HIDDEN void  slab_init_classes(shm_cache *c);
HIDDEN uint64_t slab_chunk_bytes(shm_cache *c, const item *it);
HIDDEN int   slab_free_reserved(shm_cache *c, item *it);
HIDDEN int   slab_trim(shm_cache *c);

/* ---- eviction policy (evict.c) ---- */
HIDDEN void  ev_insert(shm_cache *c, sclass *k, item *it, uint64_t hash);
HIDDEN void  ev_remove(shm_cache *c, sclass *k, item *it);
HIDDEN void  ev_hit(shm_cache *c, item *it);
/* Pick and remove one victim from class k (lock held).  Returns 1 if something was
 * freed, 0 if nothing could be evicted. */
HIDDEN int   ev_evict_one(shm_cache *c, sclass *k, int reason);
HIDDEN void  ev_ghost_remember(shm_cache *c, uint64_t hash);
HIDDEN int   ev_evict_item(shm_cache *c, sclass *k, item *it, int reason);
HIDDEN void  ev_relink(shm_cache *c, sclass *k, item *it);

/* ---- index (index.c) ---- */
/* Find key in bucket chain; *link receives the ref_t that points at it. */
HIDDEN item *idx_find(shm_cache *c, uint64_t h, const char *key, uint32_t klen,
                      ref_t **link, int *err);
/* Under stripe + class lock: take it out of the chain through *link, out of its
 * queue, and free it (or leave it a zombie while pinned). */
HIDDEN void  idx_remove_locked(shm_cache *c, sclass *k, ref_t *link, item *it);
HIDDEN uint64_t idx_hash(const char *key, uint32_t klen);

/* ---- slots, pins, repair (slots.c) ---- */
HIDDEN int   slot_claim(shm_cache *c);
HIDDEN void  slot_release(shm_cache *c);
HIDDEN void  slot_register_handle(shm_cache *c);
HIDDEN void  slot_unregister_handle(shm_cache *c);
HIDDEN int   seg_repair(shm_cache *c, int reap_only_if_needed);
HIDDEN void  seg_clear_scratch(shm_cache *c);
typedef struct held {
    shm_lock **locks;
    uint32_t n;
} held;
HIDDEN shm_lock **seg_lock_array(shm_cache *c);
HIDDEN int   seg_lock_rest(shm_cache *c, held *h);   /* stripes, classes, pool, journal */
HIDDEN void  seg_unlock_all(held *h);

/* ---- journal (journal.c) ---- */
HIDDEN void  jr_append(shm_cache *c, uint32_t op, const char *key, uint32_t klen,
                       uint64_t version, int64_t expire_ms);
HIDDEN void  jr_init(shm_cache *c);
HIDDEN int   jr_check(shm_cache *c, char **report, uint64_t *cap);

/* ---- counters ---- */
#define CTR(c, field) ADD_RLX(&(c)->ctr->field, 1)

#endif
