/* shmcache.h - the engine's public interface, and the table of contents.
 *
 * A cache that lives entirely inside one POSIX shared-memory segment so that every
 * process on a host that maps it shares one copy.  This header is the only thing the
 * cffi binding and the C tests see; everything else in native/ is private.
 *
 * Contract for callers:
 *   - Keys and values are plain bytes.  The engine knows nothing of Python objects.
 *   - Every function returns a status: >= 0 on success (some return a length or count),
 *     or a negative SHM_E* code.  shm_last_error() gives a thread-local message that
 *     names the problem (which lock, which offset, which limit).
 *   - A handle (shm_cache) is process-local and thread-safe.  A forked child gets its
 *     own process slot automatically (pthread_atfork); it keeps using the same handle.
 *   - No function here calls back into the caller while a segment lock is held.
 */
#ifndef SHMCACHE_H
#define SHMCACHE_H

#include <stddef.h>
#include <stdint.h>

/* Status codes (negative).  Keep in sync with shmcache/errors.py. */
#define SHM_OK            0
#define SHM_MISS         -1   /* key absent or expired                          */
#define SHM_EKEYLEN      -2   /* key empty or longer than max_key_len           */
#define SHM_EVALLEN      -3   /* value longer than max_value_len                */
#define SHM_EFULL        -4   /* no memory even after eviction                  */
#define SHM_ECORRUPT     -5   /* segment header or structure damaged            */
#define SHM_EINCOMPAT    -6   /* layout version / ABI / config hash mismatch    */
#define SHM_EFOREIGN     -7   /* not a shmcache segment, or wrong owner/mode    */
#define SHM_ETIMEDOUT    -8   /* a lock wait exceeded lock_timeout_ms           */
#define SHM_EEXISTS      -9   /* add(): key already present                     */
#define SHM_ENOTNUM     -10   /* incr(): value is not a decimal integer         */
#define SHM_ENOMEM      -11   /* process-local allocation failed                */
#define SHM_ESYS        -12   /* a system call failed (errno in the message)    */
#define SHM_ENOTREADY   -13   /* creator never finished initialising            */
#define SHM_EINVAL      -14   /* bad argument or configuration                  */
#define SHM_EOVERFLOW   -15   /* incr(): result out of int64 range              */
#define SHM_ENOSLOT     -16   /* every process slot is taken by a live process  */
#define SHM_EVERSION    -17   /* compare-and-set: entry's version differs       */
#define SHM_ETOOSMALL   -18   /* caller buffer too small (length returned apart) */

/* Eviction policies. */
#define SHM_POLICY_LRU     1  /* per-class LRU list, promotion rate-limited      */
#define SHM_POLICY_SIEVE   2  /* SIEVE: visited bit + moving hand                */
#define SHM_POLICY_S3FIFO  3  /* S3-FIFO: small/main FIFOs + ghost fingerprints  */

/* Write modes for shm_set. */
#define SHM_SET      0        /* insert or overwrite                             */
#define SHM_ADD      1        /* insert only if absent (else SHM_EEXISTS)        */
#define SHM_REPLACE  2        /* overwrite only if present (else SHM_MISS)       */
/* OR'ed into shm_set's mode / shm_delete_ex's opts: leave no journal record.  For
 * writes that come *from* the lower tiers (a promotion from Redis/disk, another
 * host's invalidation): journaling them would send them straight back. */
#define SHM_NOJOURNAL 0x100

/* Journal operations (shm_journal_record.op). */
#define SHM_JOP_SET     1
#define SHM_JOP_DELETE  2
#define SHM_JOP_TOUCH   3
#define SHM_JOP_CLEAR   4

/* Eviction / removal reasons (index into the *_by_reason stat arrays). */
#define SHM_REASON_CAPACITY  0   /* evicted to make room (bytes)                 */
#define SHM_REASON_ENTRIES   1   /* evicted to respect max_entries               */
#define SHM_REASON_REBALANCE 2   /* evicted while moving a page between classes  */
#define SHM_REASON_EXPIRED_READ  3  /* TTL expired, found by a read              */
#define SHM_REASON_EXPIRED_SWEEP 4  /* TTL expired, found by shm_sweep_expired   */
#define SHM_NREASONS 5

#define SHM_MAX_CLASSES 64

typedef struct shm_cache shm_cache;

typedef struct shm_config {
    uint64_t size_bytes;        /* whole segment, header included                */
    uint64_t max_value_len;     /* 0: default (1/8 of the data area)             */
    uint64_t max_entries;       /* 0: bounded by bytes only                      */
    uint64_t journal_bytes;     /* 0: no write journal                           */
    uint32_t max_key_len;       /* 0: default 250; at most 65535                 */
    uint32_t policy;            /* SHM_POLICY_*; 0: default                      */
    uint32_t nstripes;          /* index lock stripes, power of two; 0: default  */
    uint32_t avg_item_bytes;    /* index sizing hint; 0: default                 */
    uint32_t max_slots;         /* process slots; 0: default 256                 */
    uint32_t lock_timeout_ms;   /* 0: default 10000                              */
    uint32_t page_bytes;        /* slab page size, power of two; 0: 64 KiB       */
    uint32_t flags;             /* SHM_CFG_* bits                                */
} shm_config;

/* shm_config.flags */
#define SHM_CFG_VERIFY_READS 1  /* check each entry's checksum on every read; a
                                   damaged entry is dropped and counted, not served */

typedef struct shm_item_info {
    uint64_t version;           /* bumped by every write; never reused           */
    int64_t  expires_at_ms;     /* absolute, CLOCK_REALTIME ms; 0 = never        */
    uint64_t value_len;
    uint32_t flags;             /* caller-defined (serializer id etc.), 16 bits  */
    uint32_t reserved;
} shm_item_info;

typedef struct shm_class_stats {
    uint32_t chunk_bytes;       /* 0 for the large-value (page run) class        */
    uint32_t pages;
    uint64_t entries;
    uint64_t used_bytes;        /* chunk bytes held by live entries              */
    uint64_t free_bytes;        /* free chunk bytes inside this class's pages    */
    uint64_t payload_bytes;     /* header+key+value bytes actually stored        */
    uint64_t evictions;
} shm_class_stats;

typedef struct shm_counters {
    uint64_t hits, misses, sets, deletes, touches, incrs;
    uint64_t set_failures;      /* SHM_EFULL returned                            */
    uint64_t evictions[SHM_NREASONS];
    uint64_t lock_repairs;      /* EOWNERDEAD recoveries performed               */
    uint64_t corrupt_dropped;   /* entries dropped because their checksum failed */
} shm_counters;

typedef struct shm_stats {
    shm_counters total;         /* live slots + retired (reaped) processes      */
    uint64_t size_bytes, data_bytes, index_buckets;
    uint64_t entries, max_entries;
    uint64_t used_bytes, free_bytes, payload_bytes;
    uint64_t pages_total, pages_free;
    uint64_t journal_bytes, journal_used, journal_records, journal_dropped;
    uint64_t generation;
    uint32_t nclasses, policy, nstripes, max_slots, live_slots, page_bytes;
    uint32_t max_key_len, reserved;
    uint64_t max_value_len;
    double   fragmentation;     /* 1 - payload/used over live entries            */
} shm_stats;

typedef struct shm_slot_stats {
    int32_t  pid;
    uint32_t state;             /* 0 free, 1 live, 2 dead (not yet reaped)       */
    uint64_t generation;
    int64_t  attached_at_ms;
    uint32_t pins;              /* zero-copy reads currently held                */
    uint32_t reserved;
    shm_counters counters;
} shm_slot_stats;

typedef struct shm_journal_record {
    uint64_t version;
    int64_t  expires_at_ms;
    int64_t  at_us;             /* CLOCK_REALTIME of the write, microseconds:
                                   orders writes from different hosts in L2      */
    uint32_t op;                /* SHM_JOP_*                                     */
    uint32_t key_len;           /* key bytes follow in the drain buffer          */
} shm_journal_record;

/* ---- segment lifecycle (segment.c) ------------------------------------------ */
/* Create a new segment on an empty descriptor (from shm_open O_CREAT|O_EXCL, mode
 * 0600): sizes it, initialises every structure, then publishes the ready flag. */
int  shm_create(int fd, const shm_config *cfg, shm_cache **out);
/* Attach an existing segment.  Waits up to wait_ms for a concurrent creator to
 * publish "ready"; validates magic, layout, ABI hash, owner and permissions. */
int  shm_attach(int fd, uint32_t wait_ms, shm_cache **out);
/* Release this process's slot and unmap.  The handle is freed. */
void shm_close(shm_cache *c);
/* Thread-local description of the last error returned in this thread. */
const char *shm_last_error(void);
/* Reads the on-disk config back (what the creator asked for, defaults applied). */
int  shm_get_config(shm_cache *c, shm_config *out);
/* Test hook: a fixed clock for this handle (ms since the epoch); 0 = real time. */
void shm_set_clock(shm_cache *c, int64_t now_ms);
int64_t shm_now_ms(shm_cache *c);

/* ---- operations (ops.c) -------------------------------------------------------- */
/* Copy the value into buf.  Returns the value length; if it is larger than cap,
 * nothing is copied and the length is returned so the caller can retry. */
int64_t shm_get(shm_cache *c, const char *key, uint32_t klen, char *buf, uint64_t cap,
                shm_item_info *info);
/* Like shm_get, but the value is copied into a thread-local buffer owned by the
 * engine; *out points at it until this thread's next shm_get_tls call. */
int64_t shm_get_tls(shm_cache *c, const char *key, uint32_t klen, const char **out);
/* Metadata only (no copy, counted as neither hit nor miss); SHM_MISS when absent. */
int  shm_info(shm_cache *c, const char *key, uint32_t klen, shm_item_info *info);
/* A read served from a caller's own copy of the value (a per-process object cache
 * validated by version): fills info and counts a hit or a miss like shm_get, without
 * copying the value. */
int  shm_hit_info(shm_cache *c, const char *key, uint32_t klen, shm_item_info *info);
/* Write.  ttl_ms <= 0: no expiry.  expect_version != 0: compare-and-set.
 * *version_out (may be NULL) receives the new version. */
int  shm_set(shm_cache *c, const char *key, uint32_t klen, const char *val, uint64_t vlen,
             int64_t ttl_ms, uint32_t flags, int mode, uint64_t expect_version,
             uint64_t *version_out);
/* shm_set with an absolute expiry (CLOCK_REALTIME ms; 0: none): keeps an entry's
 * expiry exactly across a rewrite, and a value promoted from below its own. */
int  shm_set_at(shm_cache *c, const char *key, uint32_t klen, const char *val,
                uint64_t vlen, int64_t expires_at_ms, uint32_t flags, int mode,
                uint64_t expect_version, uint64_t *version_out);
/* Delete; expect_version != 0 deletes only that version (SHM_EVERSION otherwise). */
int  shm_delete(shm_cache *c, const char *key, uint32_t klen, uint64_t expect_version);
/* Append a journal record for a delete of a key this segment does not hold (so the
 * lower tiers and other hosts still drop it).  op: SHM_JOP_DELETE only. */
int  shm_journal_note(shm_cache *c, uint32_t op, const char *key, uint32_t klen);
/* shm_clear with opts (SHM_NOJOURNAL: another host's clear). */
int  shm_clear_ex(shm_cache *c, int opts);
/* shm_delete with opts (SHM_NOJOURNAL). */
int  shm_delete_ex(shm_cache *c, const char *key, uint32_t klen, uint64_t expect_version,
                   int opts);
/* Set a new TTL (<= 0: no expiry) without changing the value; bumps the version. */
int  shm_touch(shm_cache *c, const char *key, uint32_t klen, int64_t ttl_ms);
/* Add delta to a decimal int64 counter.  Missing key: SHM_MISS unless create, in
 * which case it is created as initial+delta with ttl_ms. */
int  shm_incr(shm_cache *c, const char *key, uint32_t klen, int64_t delta, int create,
              int64_t initial, int64_t ttl_ms, int64_t *result);
int  shm_contains(shm_cache *c, const char *key, uint32_t klen);   /* 1, 0 or < 0 */
int64_t shm_count(shm_cache *c);
int  shm_clear(shm_cache *c);

/* Zero-copy read: pins the entry so its bytes stay valid (even if deleted or
 * replaced meanwhile) until shm_unpin(pin_id).  A dead process's pins are released
 * when its slot is reaped. */
int  shm_pin(shm_cache *c, const char *key, uint32_t klen, const char **ptr,
             uint64_t *vlen, shm_item_info *info, uint32_t *pin_id);
/* pin_id names the slot that pinned, so a forked child cannot release its parent's
 * pin (or its own by mistake) through an inherited id: SHM_EINVAL. */
int  shm_unpin(shm_cache *c, uint32_t pin_id);

/* Key iteration for tools.  *cursor starts at 0 and is 0 again when done.  Fills
 * buf with records [uint16 klen][key bytes]; returns the number of keys written. */
int  shm_keys(shm_cache *c, uint64_t *cursor, char *buf, uint64_t cap);

/* ---- maintenance --------------------------------------------------------------- */
/* Remove up to max_items expired entries (0 = no limit); returns how many. */
int64_t shm_sweep_expired(shm_cache *c, uint64_t max_items);
/* Reap slots of dead processes (pins released, in-flight allocations freed) and
 * repair structures flagged by an EOWNERDEAD recovery.  Returns slots reaped. */
int  shm_reap(shm_cache *c);
/* Walk the whole segment; write one line per broken invariant into report (NUL-
 * terminated, truncated to cap).  Returns the number of problems found. */
int  shm_verify(shm_cache *c, char *report, uint64_t cap);

/* ---- statistics (stats.c) ------------------------------------------------------ */
int  shm_stats_get(shm_cache *c, shm_stats *out);
int  shm_class_stats_get(shm_cache *c, uint32_t cls, shm_class_stats *out);
int  shm_slot_stats_get(shm_cache *c, uint32_t slot, shm_slot_stats *out);
int  shm_my_slot(shm_cache *c);

/* ---- write journal (journal.c) ------------------------------------------------- */
/* Move up to cap bytes of journal records into buf: each is a shm_journal_record
 * followed by key_len key bytes, padded to 8 bytes.  Returns bytes written. */
int64_t shm_journal_drain(shm_cache *c, char *buf, uint64_t cap);

/* ---- misc ----------------------------------------------------------------------- */
/* The keyed 64-bit hash the index uses (stable across processes and restarts). */
uint64_t shm_hash(const void *key, uint64_t len);
/* Layout version compiled into this engine. */
uint32_t shm_layout_version(void);

#endif
