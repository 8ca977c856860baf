/* segment.c - creating, attaching and describing a segment.
 *
 * The segment begins with a header that makes attach fail-safe: magic, layout version,
 * an ABI hash (struct sizes of this build), the configuration and every region's
 * offset, all covered by a checksum; then a "ready" flag the creator publishes last, so
 * a process that attaches during creation waits instead of reading half-built state.
 * Attach recomputes the layout from the stored configuration and refuses the segment
 * (foreign, incompatible or corrupt) on any disagreement.  Layout values are copied
 * into the process-local handle once, so later damage to the header cannot steer the
 * engine outside the mapping.
 *
 * The descriptor comes from the caller (posix_ipc in Python, shm_open in C tests); the
 * engine sizes, checks and maps it itself.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define DEFAULT_KEY_LEN   250u
#define DEFAULT_STRIPES   1024u
#define DEFAULT_AVG_ITEM  256u
#define DEFAULT_SLOTS     256u
#define DEFAULT_TIMEOUT   10000u
#define DEFAULT_PAGE      65536u
#define MIN_PAGES         8u

static __thread char err_buf[512];

int seg_err(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err_buf, sizeof err_buf, fmt, ap);
    va_end(ap);
    return code;
}

const char *shm_last_error(void) { return err_buf; }

uint32_t shm_layout_version(void) { return SEG_LAYOUT_VERSION; }

static int64_t realtime_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t seg_now(shm_cache *c) { return c->fixed_clock ? c->fixed_clock : realtime_ms(); }
int64_t shm_now_ms(shm_cache *c) { return seg_now(c); }
void shm_set_clock(shm_cache *c, int64_t now_ms) { c->fixed_clock = now_ms > 0 ? now_ms : 0; }

uint64_t seg_next_version(shm_cache *c) {
    return __atomic_add_fetch(&c->hdr->version_ctr, 1, __ATOMIC_RELAXED);
}

static uint64_t abi_hash(void) {
    uint64_t v[] = {sizeof(item), sizeof(page), sizeof(sclass), sizeof(slot), sizeof(journal),
                    sizeof(seg_header), sizeof(pool), sizeof(shm_lock), sizeof(pthread_mutex_t),
                    sizeof(shm_config), sizeof(shm_counters), SHM_MAX_CLASSES, PINS_PER_SLOT,
                    SEG_LAYOUT_VERSION};
    return hash_bytes(v, sizeof v, 0x616269ULL);
}

static uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) & ~(a - 1); }
static uint64_t pow2_ceil(uint64_t v) {
    uint64_t p = 1;
    while (p < v) p <<= 1;
    return p;
}
static int is_pow2(uint64_t v) { return v && !(v & (v - 1)); }

/* Fill defaults and check limits; on success *out is the effective config. */
static int config_effective(const shm_config *in, shm_config *out) {
    *out = *in;
    if (!out->max_key_len) out->max_key_len = DEFAULT_KEY_LEN;
    if (!out->policy) out->policy = SHM_POLICY_S3FIFO;
    if (!out->nstripes) out->nstripes = DEFAULT_STRIPES;
    if (!out->avg_item_bytes) out->avg_item_bytes = DEFAULT_AVG_ITEM;
    if (!out->max_slots) out->max_slots = DEFAULT_SLOTS;
    if (!out->lock_timeout_ms) out->lock_timeout_ms = DEFAULT_TIMEOUT;
    if (!out->page_bytes) out->page_bytes = DEFAULT_PAGE;
    if (out->flags & ~(uint32_t)SHM_CFG_VERIFY_READS)
        return seg_err(SHM_EINVAL, "unknown config flags 0x%x", out->flags);
    if (out->max_key_len > 65535)
        return seg_err(SHM_EINVAL, "max_key_len %u exceeds 65535", out->max_key_len);
    if (out->policy < SHM_POLICY_LRU || out->policy > SHM_POLICY_S3FIFO)
        return seg_err(SHM_EINVAL, "unknown eviction policy %u", out->policy);
    /* A repair holds every stripe lock at once, and the kernel releases at most 2048
     * robust mutexes of a thread that dies (ROBUST_LIST_LIMIT): more stripes would
     * leave locks held forever after a process is killed mid-repair. */
    if (!is_pow2(out->nstripes) || out->nstripes > MAX_STRIPES)
        return seg_err(SHM_EINVAL, "stripes must be a power of two <= %u (a repair holds "
                       "every stripe lock, and the kernel frees at most 2048 robust locks "
                       "of a dying thread), got %u", MAX_STRIPES, out->nstripes);
    if (!is_pow2(out->page_bytes) || out->page_bytes < 4096 || out->page_bytes > (1u << 20))
        return seg_err(SHM_EINVAL, "page_bytes must be a power of two in [4 KiB, 1 MiB], "
                       "got %u", out->page_bytes);
    if (out->max_slots > 0xfffe)
        return seg_err(SHM_EINVAL, "max_slots %u exceeds 65534", out->max_slots);
    if (out->avg_item_bytes < 64) out->avg_item_bytes = 64;
    if (out->journal_bytes) out->journal_bytes = align_up(out->journal_bytes < 4096 ? 4096
                                                          : out->journal_bytes, 8);
    if (out->size_bytes > (32ULL << 30))
        return seg_err(SHM_EINVAL, "size %llu exceeds the 32 GiB limit of 32-bit refs",
                       (unsigned long long)out->size_bytes);
    return 0;
}

/* Compute every region from the effective config.  Pure: create and attach must agree. */
static int layout_compute(const shm_config *cfg, seg_header *h) {
    uint64_t off = SEG_HEADER_BYTES;
    h->header_bytes = SEG_HEADER_BYTES;
    h->slot_bytes = (uint32_t)sizeof(slot);
    h->off_slots = off;    off += (uint64_t)cfg->max_slots * sizeof(slot);
    h->off_stripes = off;  off += (uint64_t)cfg->nstripes * sizeof(shm_lock);
    /* size classes: 64 B then four per doubling up to half a page */
    uint32_t n = 0;
    h->class_size[n++] = 64;
    for (uint32_t b = 64; b < cfg->page_bytes / 2 && n + 4 < SHM_MAX_CLASSES; b *= 2)
        for (uint32_t q = 1; q <= 4; q++) h->class_size[n++] = b + b * q / 4;
    h->nslab = n;
    h->off_classes = off;  off += (uint64_t)(n + 1) * sizeof(sclass);
    h->off_pool = off;     off += sizeof(pool);
    h->off_journal = off;  off += sizeof(journal);
    h->off_jdata = off;    off += align_up(cfg->journal_bytes, CACHELINE);
    off = align_up(off, 4096);
    if (off >= cfg->size_bytes)
        return seg_err(SHM_EINVAL, "size %llu too small for the metadata (%llu bytes)",
                       (unsigned long long)cfg->size_bytes, (unsigned long long)off);
    uint64_t rest = cfg->size_bytes - off;
    uint64_t nb = pow2_ceil(rest / cfg->avg_item_bytes);
    if (nb < 1024) nb = 1024;
    if (nb > (1ULL << 31)) nb = 1ULL << 31;
    if (nb < cfg->nstripes) nb = cfg->nstripes;
    /* S3-FIFO ghost: 8-way buckets of 16-bit tags (+1 cursor byte each), about 0.95
     * slots per entry the cache can hold (max_entries, else the avg_item_bytes guess). */
    uint64_t cap_est = cfg->max_entries ? cfg->max_entries : rest / cfg->avg_item_bytes;
    uint64_t ng = cfg->policy == SHM_POLICY_S3FIFO ? (cap_est * 95 / 100 + 7) / 8 : 0;
    if (cfg->policy == SHM_POLICY_S3FIFO && ng == 0) ng = 1;
    if (ng > rest / 64) ng = rest / 64;   /* a huge max_entries must not eat the data */
    h->nbuckets = nb;
    h->nghost = ng;
    h->off_ghost = off;    off += align_up(ng * 17, 64);
    h->off_buckets = off;  off += nb * 4;
    off = align_up(off, 64);
    h->off_pages = off;
    if (off >= cfg->size_bytes)
        return seg_err(SHM_EINVAL, "size %llu too small for the index",
                       (unsigned long long)cfg->size_bytes);
    uint64_t np = (cfg->size_bytes - off) / (cfg->page_bytes + sizeof(page));
    for (;;) {
        uint64_t d = align_up(off + np * sizeof(page), 4096);
        if (np == 0 || d + np * cfg->page_bytes <= cfg->size_bytes) {
            h->off_data = d;
            break;
        }
        np--;
    }
    h->npages = np;
    if (np < MIN_PAGES)
        return seg_err(SHM_EINVAL, "size %llu leaves %llu data pages of %u bytes; at least %u "
                       "are needed (make the segment larger or the pages smaller)",
                       (unsigned long long)cfg->size_bytes, (unsigned long long)np,
                       cfg->page_bytes, MIN_PAGES);
    return 0;
}

static uint64_t header_csum(const seg_header *h) {
    return hash_bytes(h, offsetof(seg_header, hdr_csum), 0x686472ULL);
}

/* Point the handle at the regions described by a validated header. */
static void bind(shm_cache *c, uint8_t *base, uint64_t size, const seg_header *h) {
    c->base = base;
    c->size = size;
    c->hdr = (seg_header *)base;
    c->slots = (slot *)(base + h->off_slots);
    c->stripes = (shm_lock *)(base + h->off_stripes);
    c->classes = (sclass *)(base + h->off_classes);
    c->pool = (pool *)(base + h->off_pool);
    c->jr = (journal *)(base + h->off_journal);
    c->jdata = base + h->off_jdata;
    c->jcap = h->cfg.journal_bytes;
    c->ghost = (uint16_t *)(base + h->off_ghost);
    c->ghost_cursor = base + h->off_ghost + h->nghost * 16;
    c->nghost = h->nghost;
    c->buckets = (ref_t *)(base + h->off_buckets);
    c->nbuckets = h->nbuckets;
    c->bucket_mask = h->nbuckets - 1;
    c->pages = (page *)(base + h->off_pages);
    c->npages = h->npages;
    c->data_off = h->off_data;
    c->data_end = h->off_data + (h->npages * h->cfg.page_bytes);
    c->nstripes = h->cfg.nstripes;
    c->nslab = h->nslab;
    c->page_bytes = h->cfg.page_bytes;
    c->page_shift = (uint32_t)__builtin_ctz(h->cfg.page_bytes);
    c->max_slots = h->cfg.max_slots;
    c->max_key_len = h->cfg.max_key_len;
    c->policy = h->cfg.policy;
    c->lock_timeout_ms = h->cfg.lock_timeout_ms;
    c->max_value_len = h->cfg.max_value_len;
    c->max_entries = h->cfg.max_entries;
    c->verify_reads = (h->cfg.flags & SHM_CFG_VERIFY_READS) != 0;
    memcpy(c->class_size, h->class_size, sizeof c->class_size);
    c->cfg = h->cfg;
    c->slot_id = -1;
    c->ctr = &c->sink;
    c->pid = getpid();
}

static int check_owner(int fd, struct stat *st) {
    if (fstat(fd, st) != 0) return seg_err(SHM_ESYS, "fstat: %s", strerror(errno));
    if (st->st_uid != geteuid())
        return seg_err(SHM_EFOREIGN, "segment is owned by uid %u, not by this user (uid %u)",
                       (unsigned)st->st_uid, (unsigned)geteuid());
    if (st->st_mode & 077)
        return seg_err(SHM_EFOREIGN, "segment permissions %03o are wider than owner-only "
                       "(0600); refusing to use it", (unsigned)(st->st_mode & 0777));
    return 0;
}

static shm_cache *handle_new(void) {
    shm_cache *c = calloc(1, sizeof *c);
    return c;
}

int shm_create(int fd, const shm_config *cfg_in, shm_cache **out) {
    shm_config cfg;
    seg_header lay;
    struct stat st;
    *out = NULL;
    if (!cfg_in) return seg_err(SHM_EINVAL, "no configuration given");
    int rc = config_effective(cfg_in, &cfg);
    if (rc < 0) return rc;
    memset(&lay, 0, sizeof lay);
    if ((rc = layout_compute(&cfg, &lay)) < 0) return rc;
    uint64_t data = lay.npages * cfg.page_bytes;
    if (!cfg.max_value_len) cfg.max_value_len = data / 8;
    if (cfg.max_value_len > data / 10 * 9)
        return seg_err(SHM_EINVAL, "max_value_len %llu exceeds 90%% of the data area (%llu)",
                       (unsigned long long)cfg.max_value_len, (unsigned long long)data);
    if (cfg.max_value_len > 0xffffffffULL - 65536 - sizeof(item)) cfg.max_value_len =
        0xffffffffULL - 65536 - sizeof(item);
    lay.cfg = cfg;
    if ((rc = check_owner(fd, &st)) < 0) return rc;
    if (st.st_size != 0)
        return seg_err(SHM_EINVAL, "shm_create needs a new, empty object (size %lld)",
                       (long long)st.st_size);
    if (fchmod(fd, 0600) != 0 || ftruncate(fd, (off_t)cfg.size_bytes) != 0)
        return seg_err(SHM_ESYS, "sizing the segment to %llu bytes: %s",
                       (unsigned long long)cfg.size_bytes, strerror(errno));
    uint8_t *base = mmap(NULL, cfg.size_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED)
        return seg_err(SHM_ESYS, "mmap of %llu bytes: %s", (unsigned long long)cfg.size_bytes,
                       strerror(errno));
    shm_cache *c = handle_new();
    if (!c) {
        munmap(base, cfg.size_bytes);
        return seg_err(SHM_ENOMEM, "out of memory for the handle");
    }
    seg_header *h = (seg_header *)base;
    memcpy(h, &lay, offsetof(seg_header, hdr_csum));
    h->magic = SEG_MAGIC;
    h->layout_version = SEG_LAYOUT_VERSION;
    h->abi_hash = abi_hash();
    h->size_bytes = cfg.size_bytes;
    h->created_ms = realtime_ms();
    h->generation = hash_bytes(&h->created_ms, 8, (uint64_t)getpid()) | 1;
    h->hdr_csum = header_csum(h);
    bind(c, base, cfg.size_bytes, h);
    rc = lock_init(&h->slot_lock, 0);
    for (uint32_t i = 0; rc == 0 && i < c->max_slots; i++) rc = lock_init(&c->slots[i].live, i);
    for (uint32_t i = 0; rc == 0 && i < c->nstripes; i++) rc = lock_init(&c->stripes[i], i);
    for (uint32_t i = 0; rc == 0 && i <= c->nslab; i++) rc = lock_init(&c->classes[i].lock, i);
    if (rc == 0) rc = lock_init(&c->pool->lock, 0);
    if (rc == 0) rc = lock_init(&c->jr->lock, 0);
    if (rc < 0) {
        munmap(base, cfg.size_bytes);
        free(c);
        return rc;
    }
    slab_init_classes(c);
    for (uint64_t i = 0; i < c->npages; i++) c->pages[i].cls = PG_FREE;
    c->pool->free_pages = c->npages;
    jr_init(c);
    STORE(&h->ready, 1u);
    if ((rc = slot_claim(c)) < 0) {
        munmap(base, cfg.size_bytes);
        free(c);
        return rc;
    }
    slot_register_handle(c);
    *out = c;
    return 0;
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Validate a mapped header against this build and against itself. */
static int header_check(const seg_header *h, uint64_t size, seg_header *lay) {
    if (h->magic != SEG_MAGIC)
        return seg_err(SHM_EFOREIGN, "not a shmcache segment (bad magic)");
    if (h->layout_version != SEG_LAYOUT_VERSION)
        return seg_err(SHM_EINCOMPAT, "segment layout version %u, this engine speaks %u",
                       h->layout_version, SEG_LAYOUT_VERSION);
    if (h->abi_hash != abi_hash())
        return seg_err(SHM_EINCOMPAT, "segment was made by an engine build with another ABI");
    if (h->hdr_csum != header_csum(h))
        return seg_err(SHM_ECORRUPT, "segment header checksum mismatch");
    if (h->size_bytes != size)
        return seg_err(SHM_ECORRUPT, "segment header says %llu bytes, object has %llu",
                       (unsigned long long)h->size_bytes, (unsigned long long)size);
    shm_config eff;
    if (config_effective(&h->cfg, &eff) < 0 || memcmp(&eff, &h->cfg, sizeof eff) != 0)
        return seg_err(SHM_ECORRUPT, "segment header holds an invalid configuration");
    memset(lay, 0, sizeof *lay);
    if (layout_compute(&h->cfg, lay) < 0 || lay->nslab != h->nslab ||
        lay->off_slots != h->off_slots || lay->off_stripes != h->off_stripes ||
        lay->off_classes != h->off_classes || lay->off_pool != h->off_pool ||
        lay->off_journal != h->off_journal || lay->off_jdata != h->off_jdata ||
        lay->off_ghost != h->off_ghost || lay->off_buckets != h->off_buckets ||
        lay->off_pages != h->off_pages || lay->off_data != h->off_data ||
        lay->nbuckets != h->nbuckets || lay->npages != h->npages || lay->nghost != h->nghost ||
        memcmp(lay->class_size, h->class_size, sizeof lay->class_size) != 0 ||
        lay->off_data + lay->npages * h->cfg.page_bytes > size)
        return seg_err(SHM_ECORRUPT, "segment header layout does not match its configuration");
    lay->cfg = h->cfg;
    return 0;
}

int shm_attach(int fd, uint32_t wait_ms, shm_cache **out) {
    struct stat st;
    *out = NULL;
    int rc = check_owner(fd, &st);
    if (rc < 0) return rc;
    long waited = 0;
    /* A concurrent creator may not have sized the object yet. */
    while (st.st_size == 0 && waited < (long)wait_ms) {
        sleep_ms(2);
        waited += 2;
        if (fstat(fd, &st) != 0) return seg_err(SHM_ESYS, "fstat: %s", strerror(errno));
    }
    if (st.st_size == 0)
        return seg_err(SHM_ENOTREADY, "segment is empty: its creator never sized it");
    if ((uint64_t)st.st_size < SEG_HEADER_BYTES)
        return seg_err(SHM_EFOREIGN, "object of %lld bytes is too small to be a segment",
                       (long long)st.st_size);
    uint64_t size = (uint64_t)st.st_size;
    uint8_t *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (base == MAP_FAILED)
        return seg_err(SHM_ESYS, "mmap of %llu bytes: %s", (unsigned long long)size,
                       strerror(errno));
    seg_header *h = (seg_header *)base;
    while (LOAD(&h->ready) != 1u && waited < (long)wait_ms) {
        uint64_t m = LOAD_RLX(&h->magic);
        if (m != 0 && m != SEG_MAGIC) break;
        sleep_ms(2);
        waited += 2;
    }
    if (LOAD(&h->ready) != 1u) {
        uint64_t magic = h->magic;
        munmap(base, size);
        if (magic != 0 && magic != SEG_MAGIC)
            return seg_err(SHM_EFOREIGN, "not a shmcache segment (bad magic)");
        return seg_err(SHM_ENOTREADY, "segment never became ready within %u ms (its creator "
                       "died while initialising it?)", wait_ms);
    }
    seg_header lay;
    if ((rc = header_check(h, size, &lay)) < 0) {
        munmap(base, size);
        return rc;
    }
    shm_cache *c = handle_new();
    if (!c) {
        munmap(base, size);
        return seg_err(SHM_ENOMEM, "out of memory for the handle");
    }
    bind(c, base, size, &lay);
    if ((rc = slot_claim(c)) < 0) {
        munmap(base, size);
        free(c);
        return rc;
    }
    slot_register_handle(c);
    /* Finish what crashed processes left behind before serving anything. */
    rc = seg_repair(c, 1);
    if (rc < 0 && rc != SHM_ETIMEDOUT) {
        shm_close(c);
        return rc;
    }
    *out = c;
    return 0;
}

void shm_close(shm_cache *c) {
    if (!c) return;
    slot_unregister_handle(c);
    slot_release(c);
    munmap(c->base, c->size);
    free(c);
}

int shm_get_config(shm_cache *c, shm_config *out) {
    *out = c->cfg;
    return 0;
}
