/* ops.c - the public operations: get, set, delete, touch, incr, pin, keys, sweep.
 *
 * Shape of every operation: validate arguments, hash the key, take the key's index
 * stripe, act, release, then (outside every lock) append to the journal and count.
 * A write is crash-consistent: the value, key and checksum are written into a chunk the
 * writer reserved, and only then published with one release-store of its ref into the
 * chain.  A reader therefore never sees half an entry; a writer killed before that
 * store leaves only a reserved chunk that reaping frees.
 *
 * An operation that meets a lock left behind by a dead process gets SHM_EREPAIR from
 * the lock helpers, unwinds, lets seg_repair() rebuild, and retries.
 */
#include <stdlib.h>

#include "internal.h"

#define RETRIES 4

static inline int check_key(shm_cache *c, const char *key, uint32_t klen) {
    if (UNLIKELY(!key || klen == 0 || klen > c->max_key_len))
        return seg_err(SHM_EKEYLEN, "key length %u is outside 1..%u bytes", klen,
                       c->max_key_len);
    return 0;
}

static inline int stripe_lock(shm_cache *c, shm_lock *s) {
    int r = lock_acquire(c, s, "index stripe");
    if (UNLIKELY(r == LOCK_REPAIR)) {
        lock_release(s);
        return SHM_EREPAIR;
    }
    return r;
}

/* The class lock of an indexed item (stripe held). */
static inline int class_lock(shm_cache *c, const item *it, sclass **kp) {
    if (UNLIKELY(it->cls > c->nslab)) {
        STORE(&c->hdr->needs_repair, 1u);
        return SHM_EREPAIR;
    }
    sclass *k = &c->classes[it->cls];
    int r = lock_acquire(c, &k->lock, "size class");
    if (UNLIKELY(r == LOCK_REPAIR)) {
        lock_release(&k->lock);
        return SHM_EREPAIR;
    }
    *kp = k;
    return r;
}

static inline int repair_pending(shm_cache *c) {
    if (UNLIKELY(LOAD_RLX(&c->hdr->needs_repair))) {
        int r = seg_repair(c, 1);
        if (r < 0) return r;
    }
    return 0;
}

static int repaired(shm_cache *c, int attempt) {
    if (attempt >= RETRIES)
        return seg_err(SHM_ECORRUPT, "segment still inconsistent after %d repairs", RETRIES);
    int r = seg_repair(c, 1);
    return r < 0 ? r : 0;
}

static inline void fill_info(shm_item_info *info, const item *it) {
    info->version = it->version;
    info->expires_at_ms = it->expire_ms;
    info->value_len = it->vlen;
    info->flags = it->flags;
    info->reserved = 0;
}

/* Remove an entry found under its stripe lock and count why in *counter. */
static int drop_entry(shm_cache *c, ref_t *link, item *it, uint64_t *counter) {
    sclass *k;
    int r = class_lock(c, it, &k);
    if (r < 0) return r;
    idx_remove_locked(c, k, link, it);
    lock_release(&k->lock);
    ADD_RLX(counter, 1);
    return 0;
}

static int drop_expired(shm_cache *c, ref_t *link, item *it, int reason) {
    return drop_entry(c, link, it, &c->ctr->evictions[reason]);
}

/* A checksum failure under verify_reads: the entry is unlinked (its chunk freed by the
 * usual path) and counted, never served. */
static int drop_damaged(shm_cache *c, ref_t *link, item *it) {
    return drop_entry(c, link, it, &c->ctr->corrupt_dropped);
}

/* Take the key's stripe lock and find its entry.  0: found, the stripe is held (*sp,
 * *linkp, *itp set); SHM_MISS: absent, released; < 0: error or SHM_EREPAIR, released. */
static int lookup_locked(shm_cache *c, const char *key, uint32_t klen, uint64_t h,
                         shm_lock **sp, ref_t **linkp, item **itp) {
    shm_lock *s = *sp = &c->stripes[stripe_of(c, h)];
    int r = stripe_lock(c, s);
    if (UNLIKELY(r < 0)) return r;
    int err = 0;
    *itp = idx_find(c, h, key, klen, linkp, &err);
    if (*itp) return 0;
    lock_release(s);
    return err ? err : SHM_MISS;
}

/* ---- reads ---- */

static int64_t get_once(shm_cache *c, const char *key, uint32_t klen, uint64_t h, char *buf,
                        uint64_t cap, shm_item_info *info, int count) {
    shm_lock *s;
    ref_t *link;
    item *it;
    int r = lookup_locked(c, key, klen, h, &s, &link, &it);
    if (r < 0) {
        if (r == SHM_MISS && count) CTR(c, misses);
        return r;
    }
    if (it->expire_ms && expired(it, seg_now(c))) {
        r = drop_expired(c, link, it, SHM_REASON_EXPIRED_READ);
        lock_release(s);
        if (r < 0) return r;
        if (count) CTR(c, misses);
        return SHM_MISS;
    }
    if (UNLIKELY(c->verify_reads) && hash_item_csum(it) != it->csum) {
        r = drop_damaged(c, link, it);
        lock_release(s);
        if (count) CTR(c, misses);
        return r < 0 ? r : SHM_MISS;
    }
    uint64_t n = it->vlen;
    if (info) fill_info(info, it);
    int hit = count && (n <= cap || !buf);   /* !buf: shm_hit_info, nothing to copy */
    if (hit) {
        if (n && buf) memcpy(buf, item_val(it), n);
        ev_hit(c, it);
    }
    lock_release(s);
    if (hit) CTR(c, hits);
    return (int64_t)n;
}

static int64_t get_counted(shm_cache *c, const char *key, uint32_t klen, char *buf,
                           uint64_t cap, shm_item_info *info, int count) {
    int r = check_key(c, key, klen);
    if (UNLIKELY(r < 0) || UNLIKELY((r = repair_pending(c)) < 0)) return r;
    uint64_t h = idx_hash(key, klen);
    for (int a = 0;; a++) {
        int64_t n = get_once(c, key, klen, h, buf, cap, info, count);
        if (LIKELY(n != SHM_EREPAIR)) return n;
        if ((r = repaired(c, a)) < 0) return r;
    }
}

int64_t shm_get(shm_cache *c, const char *key, uint32_t klen, char *buf, uint64_t cap,
                shm_item_info *info) {
    return get_counted(c, key, klen, buf, cap, info, 1);
}

static __thread char *tls_buf;
static __thread uint64_t tls_cap;

int64_t shm_get_tls(shm_cache *c, const char *key, uint32_t klen, const char **out) {
    for (;;) {
        int64_t n = shm_get(c, key, klen, tls_buf, tls_cap, NULL);
        if (n < 0 || (uint64_t)n <= tls_cap) {
            *out = tls_buf;
            return n;
        }
        uint64_t want = (uint64_t)n < 4096 ? 4096 : (uint64_t)n;
        char *nb = realloc(tls_buf, want);
        if (!nb) return seg_err(SHM_ENOMEM, "out of memory for a %llu-byte value",
                                (unsigned long long)n);
        tls_buf = nb;
        tls_cap = want;
    }
}

int shm_hit_info(shm_cache *c, const char *key, uint32_t klen, shm_item_info *info) {
    int64_t n = get_counted(c, key, klen, NULL, 0, info, 1);
    return n < 0 ? (int)n : 0;
}

int shm_info(shm_cache *c, const char *key, uint32_t klen, shm_item_info *info) {
    int64_t n = get_counted(c, key, klen, NULL, 0, info, 0);   /* not a hit or a miss */
    return n < 0 ? (int)n : 0;
}

static int contains_once(shm_cache *c, const char *key, uint32_t klen, uint64_t h) {
    shm_lock *s;
    ref_t *link;
    item *it;
    int r = lookup_locked(c, key, klen, h, &s, &link, &it);
    if (r < 0) return r == SHM_MISS ? 0 : r;
    int live = !expired(it, it->expire_ms ? seg_now(c) : 0);
    lock_release(s);
    return live;
}

int shm_contains(shm_cache *c, const char *key, uint32_t klen) {
    int r = check_key(c, key, klen);
    if (r < 0 || (r = repair_pending(c)) < 0) return r;
    uint64_t h = idx_hash(key, klen);
    for (int a = 0;; a++) {
        r = contains_once(c, key, klen, h);
        if (r != SHM_EREPAIR) return r;
        if ((r = repaired(c, a)) < 0) return r;
    }
}

int64_t shm_count(shm_cache *c) {
    int r = repair_pending(c);
    if (r < 0) return r;
    return (int64_t)LOAD_RLX(&c->hdr->entries);
}

/* ---- writes ---- */

/* Publish a reserved, fully written item.  *linked tells the caller, on SHM_EREPAIR,
 * whether the item is already in the index (then the write has happened). */
static int publish(shm_cache *c, item *it, uint64_t h, int mode, uint64_t expect,
                   uint64_t *ver, int *linked) {
    shm_lock *s = &c->stripes[stripe_of(c, h)];
    int r = stripe_lock(c, s);
    if (r < 0) return r;
    int err = 0;
    ref_t *link;
    item *old = idx_find(c, h, item_key(it), it->klen, &link, &err);
    if (err) {
        lock_release(s);
        return err;
    }
    int old_live = old && !expired(old, old->expire_ms ? seg_now(c) : 0);
    if (mode == SHM_ADD && old_live) r = seg_err(SHM_EEXISTS, "key already present");
    else if (mode == SHM_REPLACE && !old_live) r = SHM_MISS;
    else if (expect && (!old_live || old->version != expect))
        r = seg_err(SHM_EVERSION, "entry is at version %llu, not %llu",
                    (unsigned long long)(old_live ? old->version : 0),
                    (unsigned long long)expect);
    if (r < 0) {
        lock_release(s);
        return r;
    }
    sclass *k;
    if ((r = class_lock(c, it, &k)) < 0) {
        lock_release(s);
        return r;
    }
    it->version = seg_next_version(c);
    it->state = IT_LINKED;
    ev_insert(c, k, it, h);
    k->entries++;
    k->payload_bytes += item_total(it);
    lock_release(&k->lock);
    *ver = it->version;
    if (old) {
        it->hnext = old->hnext;
        STORE(link, item_ref(c, it));
        *linked = 1;
        sclass *ko;
        if ((r = class_lock(c, old, &ko)) < 0) {
            lock_release(s);
            return r;   /* old stays as an unindexed leftover; repair frees it */
        }
        ev_remove(c, ko, old);
        ko->entries--;
        ko->payload_bytes -= item_total(old);
        if (LOAD(&old->pins)) old->state = (uint8_t)((old->state & ~IT_STATE_MASK) | IT_ZOMBIE);
        else slab_free_locked(c, ko, old);
        lock_release(&ko->lock);
        if (!old_live) ADD_RLX(&c->ctr->evictions[SHM_REASON_EXPIRED_READ], 1);
    } else {
        ref_t *head = &c->buckets[h & c->bucket_mask];
        it->hnext = LOAD(head);
        STORE(head, item_ref(c, it));
        *linked = 1;
        ADD_RLX(&c->hdr->entries, 1);
    }
    lock_release(s);
    return 0;
}

static int set_abs(shm_cache *c, const char *key, uint32_t klen, const char *val,
                   uint64_t vlen, int64_t expire_ms, uint32_t flags, int mode,
                   uint64_t expect, uint64_t *version_out) {
    int r = check_key(c, key, klen);
    if (r < 0) return r;
    if (UNLIKELY(vlen > c->max_value_len))
        return seg_err(SHM_EVALLEN, "value of %llu bytes exceeds max_value_len %llu",
                       (unsigned long long)vlen, (unsigned long long)c->max_value_len);
    int journal = !(mode & SHM_NOJOURNAL);
    mode &= ~SHM_NOJOURNAL;
    if (UNLIKELY(mode < SHM_SET || mode > SHM_REPLACE || flags > 0xffff || (vlen && !val)))
        return seg_err(SHM_EINVAL, "invalid write mode, flags or value");
    if ((r = repair_pending(c)) < 0) return r;
    uint64_t h = idx_hash(key, klen);
    uint64_t total = sizeof(item) + klen + vlen;
    item *it = NULL;
    for (int a = 0; !it; a++) {
        int err = 0;
        it = slab_alloc(c, total, &err);
        if (it) break;
        if (err != LOCK_REPAIR) {
            if (err == SHM_EFULL) CTR(c, set_failures);
            return err;
        }
        if ((r = repaired(c, a)) < 0) return r;
    }
    it->klen = (uint16_t)klen;
    it->vlen = (uint32_t)vlen;
    it->flags = (uint16_t)flags;
    it->expire_ms = expire_ms;
    memcpy((char *)(it + 1), key, klen);
    if (vlen) memcpy(item_val(it), val, vlen);
    it->csum = hash_item_csum(it);
    uint64_t ver = 0;
    for (int a = 0;; a++) {
        int linked = 0;
        r = publish(c, it, h, mode, expect, &ver, &linked);
        if (r != SHM_EREPAIR) break;
        int rr = repaired(c, a);
        if (linked) {
            r = 0;
            break;
        }
        if (rr < 0) {
            r = rr;
            break;
        }
    }
    if (r < 0) {
        slab_free_reserved(c, it);
        return r;
    }
    CTR(c, sets);
    if (c->jcap && journal) jr_append(c, SHM_JOP_SET, key, klen, ver, expire_ms);
    if (version_out) *version_out = ver;
    return 0;
}

int shm_set(shm_cache *c, const char *key, uint32_t klen, const char *val, uint64_t vlen,
            int64_t ttl_ms, uint32_t flags, int mode, uint64_t expect_version,
            uint64_t *version_out) {
    int64_t exp = ttl_ms > 0 ? seg_now(c) + ttl_ms : 0;
    return set_abs(c, key, klen, val, vlen, exp, flags, mode, expect_version, version_out);
}

int shm_set_at(shm_cache *c, const char *key, uint32_t klen, const char *val,
               uint64_t vlen, int64_t expires_at_ms, uint32_t flags, int mode,
               uint64_t expect_version, uint64_t *version_out) {
    return set_abs(c, key, klen, val, vlen, expires_at_ms > 0 ? expires_at_ms : 0, flags,
                   mode, expect_version, version_out);
}

static int delete_once(shm_cache *c, const char *key, uint32_t klen, uint64_t h,
                       uint64_t expect) {
    shm_lock *s;
    ref_t *link;
    item *it;
    int r = lookup_locked(c, key, klen, h, &s, &link, &it);
    if (r < 0) return r;
    int live = !expired(it, it->expire_ms ? seg_now(c) : 0);
    if (expect && (!live || it->version != expect)) {
        lock_release(s);
        return seg_err(SHM_EVERSION, "entry is at version %llu, not %llu",
                       (unsigned long long)it->version, (unsigned long long)expect);
    }
    sclass *k;
    if ((r = class_lock(c, it, &k)) < 0) {
        lock_release(s);
        return r;
    }
    idx_remove_locked(c, k, link, it);
    lock_release(&k->lock);
    lock_release(s);
    if (!live) {
        ADD_RLX(&c->ctr->evictions[SHM_REASON_EXPIRED_READ], 1);
        return SHM_MISS;
    }
    return 0;
}

int shm_delete(shm_cache *c, const char *key, uint32_t klen, uint64_t expect_version) {
    return shm_delete_ex(c, key, klen, expect_version, 0);
}

int shm_delete_ex(shm_cache *c, const char *key, uint32_t klen, uint64_t expect_version,
                  int opts) {
    int r = check_key(c, key, klen);
    if (r < 0 || (r = repair_pending(c)) < 0) return r;
    uint64_t h = idx_hash(key, klen);
    for (int a = 0;; a++) {
        r = delete_once(c, key, klen, h, expect_version);
        if (r != SHM_EREPAIR) break;
        int rr = repaired(c, a);
        if (rr < 0) return rr;
    }
    if (r == 0) {
        CTR(c, deletes);
        if (c->jcap && !(opts & SHM_NOJOURNAL))
            jr_append(c, SHM_JOP_DELETE, key, klen, seg_next_version(c), 0);
    }
    return r;
}

static int touch_once(shm_cache *c, const char *key, uint32_t klen, uint64_t h,
                      int64_t ttl_ms, uint64_t *ver, int64_t *exp) {
    shm_lock *s;
    ref_t *link;
    item *it;
    int r = lookup_locked(c, key, klen, h, &s, &link, &it);
    if (r < 0) return r;
    int64_t now = seg_now(c);
    if (expired(it, now)) {
        r = drop_expired(c, link, it, SHM_REASON_EXPIRED_READ);
        lock_release(s);
        return r < 0 ? r : SHM_MISS;
    }
    it->expire_ms = *exp = ttl_ms > 0 ? now + ttl_ms : 0;
    it->version = *ver = seg_next_version(c);
    lock_release(s);
    return 0;
}

int shm_touch(shm_cache *c, const char *key, uint32_t klen, int64_t ttl_ms) {
    int r = check_key(c, key, klen);
    if (r < 0 || (r = repair_pending(c)) < 0) return r;
    uint64_t h = idx_hash(key, klen), ver = 0;
    int64_t exp = 0;
    for (int a = 0;; a++) {
        r = touch_once(c, key, klen, h, ttl_ms, &ver, &exp);
        if (r != SHM_EREPAIR) break;
        int rr = repaired(c, a);
        if (rr < 0) return rr;
    }
    if (r == 0) {
        CTR(c, touches);
        if (c->jcap) jr_append(c, SHM_JOP_TOUCH, key, klen, ver, exp);
    }
    return r;
}

/* ---- counters ---- */

#define INCR_COW    1   /* value must move to a new chunk: set with compare-and-set */
#define INCR_CREATE 2   /* key absent and create requested */

static int parse_i64(const char *p, uint32_t n, int64_t *out) {
    uint32_t i = 0;
    int neg = 0;
    if (n == 0 || n > 20) return -1;
    if (p[0] == '-' || p[0] == '+') {
        neg = p[0] == '-';
        if (++i == n) return -1;
    }
    uint64_t v = 0, lim = neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;
    for (; i < n; i++) {
        if (p[i] < '0' || p[i] > '9') return -1;
        uint64_t d = (uint64_t)(p[i] - '0');
        if (v > (lim - d) / 10) return -1;
        v = v * 10 + d;
    }
    *out = neg ? (int64_t)(0 - v) : (int64_t)v;
    return 0;
}

static uint32_t format_i64(int64_t v, char *buf) {
    char tmp[24];
    uint32_t n = 0;
    uint64_t u = v < 0 ? 0 - (uint64_t)v : (uint64_t)v;
    do tmp[n++] = (char)('0' + u % 10); while (u /= 10);
    uint32_t len = 0;
    if (v < 0) buf[len++] = '-';
    while (n) buf[len++] = tmp[--n];
    return len;
}

static int incr_once(shm_cache *c, const char *key, uint32_t klen, uint64_t h, int64_t delta,
                     int64_t *result, char *txt, uint32_t *tlen, uint64_t *old_ver,
                     int64_t *old_exp, uint32_t *old_flags, uint64_t *ver) {
    shm_lock *s;
    ref_t *link;
    item *it;
    int r = lookup_locked(c, key, klen, h, &s, &link, &it);
    if (r < 0) return r == SHM_MISS ? INCR_CREATE : r;
    if (it->expire_ms && expired(it, seg_now(c))) {
        r = drop_expired(c, link, it, SHM_REASON_EXPIRED_READ);
        lock_release(s);
        return r < 0 ? r : INCR_CREATE;
    }
    int64_t cur, nv;
    if (parse_i64(item_val(it), it->vlen, &cur) < 0) {
        lock_release(s);
        return seg_err(SHM_ENOTNUM, "value is not a decimal 64-bit integer");
    }
    if (__builtin_add_overflow(cur, delta, &nv)) {
        lock_release(s);
        return seg_err(SHM_EOVERFLOW, "%lld %+lld leaves the signed 64-bit range",
                       (long long)cur, (long long)delta);
    }
    *result = nv;
    *tlen = format_i64(nv, txt);
    uint64_t chunk = slab_chunk_bytes(c, it);
    if (LOAD(&it->pins) || sizeof(item) + klen + *tlen > chunk) {
        *old_ver = it->version;
        *old_exp = it->expire_ms;
        *old_flags = it->flags;
        lock_release(s);
        return INCR_COW;
    }
    sclass *k;
    if ((r = class_lock(c, it, &k)) < 0) {
        lock_release(s);
        return r;
    }
    k->payload_bytes -= item_total(it);
    memcpy(item_val(it), txt, *tlen);
    it->vlen = *tlen;
    it->csum = hash_item_csum(it);
    it->version = *ver = seg_next_version(c);
    k->payload_bytes += item_total(it);
    lock_release(&k->lock);
    *old_exp = it->expire_ms;
    lock_release(s);
    return 0;
}

int shm_incr(shm_cache *c, const char *key, uint32_t klen, int64_t delta, int create,
             int64_t initial, int64_t ttl_ms, int64_t *result) {
    int r = check_key(c, key, klen);
    if (r < 0 || (r = repair_pending(c)) < 0) return r;
    uint64_t h = idx_hash(key, klen);
    char txt[24];
    for (int a = 0, repairs = 0; a < 1000; a++) {
        uint32_t tlen = 0, flags = 0;
        uint64_t old_ver = 0, ver = 0;
        int64_t exp = 0, nv = 0;
        r = incr_once(c, key, klen, h, delta, &nv, txt, &tlen, &old_ver, &exp, &flags, &ver);
        if (r == SHM_EREPAIR) {
            if ((r = repaired(c, repairs++)) < 0) return r;
            continue;
        }
        if (r == INCR_CREATE) {
            if (!create) return SHM_MISS;
            if (__builtin_add_overflow(initial, delta, &nv))
                return seg_err(SHM_EOVERFLOW, "initial %lld %+lld leaves the signed 64-bit "
                               "range", (long long)initial, (long long)delta);
            tlen = format_i64(nv, txt);
            r = set_abs(c, key, klen, txt, tlen, ttl_ms > 0 ? seg_now(c) + ttl_ms : 0, 0,
                        SHM_ADD, 0, NULL);
            if (r == SHM_EEXISTS) continue;
        } else if (r == INCR_COW) {
            r = set_abs(c, key, klen, txt, tlen, exp, flags, SHM_SET, old_ver, NULL);
            if (r == SHM_EVERSION) continue;
        } else if (r == 0) {
            if (c->jcap) jr_append(c, SHM_JOP_SET, key, klen, ver, exp);
        }
        if (r == 0) {
            *result = nv;
            CTR(c, incrs);
        }
        return r;
    }
    return seg_err(SHM_ETIMEDOUT, "incr kept losing races on one key");
}

/* ---- clear, keys, sweep ---- */

/* Walk every chain of stripe si (lock held), removing entries for which drop() says
 * so; counts and returns them.  Stops early at max (0 = no limit). */
static int64_t stripe_sweep(shm_cache *c, uint32_t si, int64_t now, uint64_t max, int all) {
    int64_t n = 0;
    for (uint64_t b = si; b < c->nbuckets; b += c->nstripes) {
        ref_t *link = &c->buckets[b];
        for (uint32_t steps = 0; steps < MAX_CHAIN_STEPS; steps++) {
            ref_t r = LOAD(link);
            if (!r) break;
            item *it = ref_item(c, r);
            if (!it || !item_sane(c, it)) {
                STORE(&c->hdr->needs_repair, 1u);
                break;
            }
            if (!all && !expired(it, now)) {
                link = &it->hnext;
                continue;
            }
            sclass *k;
            int rc = class_lock(c, it, &k);
            if (rc < 0) return rc;
            idx_remove_locked(c, k, link, it);
            lock_release(&k->lock);
            if (!all) ADD_RLX(&c->ctr->evictions[SHM_REASON_EXPIRED_SWEEP], 1);
            if (max && (uint64_t)++n >= max) return n;
            if (!max) n++;
        }
    }
    return n;
}

static int64_t sweep_all(shm_cache *c, uint64_t max, int all) {
    int r = repair_pending(c);
    if (r < 0) return r;
    int64_t total = 0;
    for (uint32_t si = 0; si < c->nstripes; si++) {
        for (int a = 0;; a++) {
            shm_lock *s = &c->stripes[si];
            int64_t n = stripe_lock(c, s);
            if (n == 0) {
                n = stripe_sweep(c, si, seg_now(c), max ? max - (uint64_t)total : 0, all);
                lock_release(s);
            }
            if (n == SHM_EREPAIR) {
                if ((r = repaired(c, a)) < 0) return r;
                continue;
            }
            if (n < 0) return n;
            total += n;
            break;
        }
        if (max && (uint64_t)total >= max) break;
    }
    return total;
}

int shm_clear(shm_cache *c) { return shm_clear_ex(c, 0); }

int shm_clear_ex(shm_cache *c, int opts) {
    int64_t n = sweep_all(c, 0, 1);
    if (n < 0) return (int)n;
    int r = slab_trim(c);
    if (r < 0) return r;
    if (c->jcap && !(opts & SHM_NOJOURNAL))
        jr_append(c, SHM_JOP_CLEAR, "", 0, seg_next_version(c), 0);
    return 0;
}

int shm_journal_note(shm_cache *c, uint32_t op, const char *key, uint32_t klen) {
    if (op != SHM_JOP_DELETE) return seg_err(SHM_EINVAL, "only deletes can be noted");
    int r = check_key(c, key, klen);
    if (r < 0) return r;
    if (c->jcap) jr_append(c, op, key, klen, seg_next_version(c), 0);
    return 0;
}

int64_t shm_sweep_expired(shm_cache *c, uint64_t max_items) {
    return sweep_all(c, max_items, 0);
}

int shm_keys(shm_cache *c, uint64_t *cursor, char *buf, uint64_t cap) {
    int r = repair_pending(c);
    if (r < 0) return r;
    uint64_t b = *cursor, used = 0;
    int n = 0;
    int64_t now = seg_now(c);
    for (; b < c->nbuckets; b++) {
        shm_lock *s = &c->stripes[b & (c->nstripes - 1)];
        if ((r = stripe_lock(c, s)) < 0) {
            if (r != SHM_EREPAIR || (r = repaired(c, 0)) < 0) return r;
            b--;
            continue;
        }
        uint64_t need = 0, cnt = 0;
        ref_t rr = LOAD(&c->buckets[b]);
        for (uint32_t steps = 0; rr && steps < MAX_CHAIN_STEPS; steps++) {
            item *it = ref_item(c, rr);
            if (!it || !item_sane(c, it)) break;
            if (!expired(it, now)) need += 2u + it->klen, cnt++;
            rr = it->hnext;
        }
        if (used + need > cap) {
            lock_release(s);
            if (n == 0 && cnt)
                return seg_err(SHM_ETOOSMALL, "key buffer of %llu bytes is too small",
                               (unsigned long long)cap);
            break;
        }
        rr = LOAD(&c->buckets[b]);
        for (uint32_t steps = 0; rr && steps < MAX_CHAIN_STEPS && cnt; steps++) {
            item *it = ref_item(c, rr);
            if (!it || !item_sane(c, it)) break;
            if (!expired(it, now)) {
                uint16_t kl = it->klen;
                memcpy(buf + used, &kl, 2);
                memcpy(buf + used + 2, item_key(it), kl);
                used += 2u + kl;
                n++;
                cnt--;
            }
            rr = it->hnext;
        }
        lock_release(s);
    }
    *cursor = b >= c->nbuckets ? 0 : b;
    return n;
}

/* ---- zero-copy reads ---- */

static int pin_once(shm_cache *c, const char *key, uint32_t klen, uint64_t h,
                    const char **ptr, uint64_t *vlen, shm_item_info *info, uint32_t *pin_id) {
    slot *sl = &c->slots[c->slot_id];
    shm_lock *s;
    ref_t *link;
    item *it;
    int r = lookup_locked(c, key, klen, h, &s, &link, &it);
    if (r == SHM_MISS) CTR(c, misses);
    if (r < 0) return r;
    if (it->expire_ms && expired(it, seg_now(c))) {
        r = drop_expired(c, link, it, SHM_REASON_EXPIRED_READ);
        lock_release(s);
        if (r < 0) return r;
        CTR(c, misses);
        return SHM_MISS;
    }
    if (UNLIKELY(c->verify_reads) && hash_item_csum(it) != it->csum) {
        r = drop_damaged(c, link, it);
        lock_release(s);
        CTR(c, misses);
        return r < 0 ? r : SHM_MISS;
    }
    if (LOAD(&it->pins) >= 0xfff0) {
        lock_release(s);
        return seg_err(SHM_EINVAL, "entry is pinned too many times");
    }
    ref_t ref = item_ref(c, it);
    uint32_t i;
    for (i = 0; i < PINS_PER_SLOT; i++) {
        ref_t zero = 0;
        if (__atomic_compare_exchange_n(&sl->pins[i], &zero, ref, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_RELAXED))
            break;
    }
    if (i == PINS_PER_SLOT) {
        lock_release(s);
        return seg_err(SHM_EINVAL, "this process already holds %u pinned values; release "
                       "some first", PINS_PER_SLOT);
    }
    __atomic_add_fetch(&it->pins, 1, __ATOMIC_ACQ_REL);
    *ptr = item_val(it);
    *vlen = it->vlen;
    if (info) fill_info(info, it);
    *pin_id = ((uint32_t)(c->slot_id + 1) << 8) | i;
    ev_hit(c, it);
    lock_release(s);
    CTR(c, hits);
    return 0;
}

int shm_pin(shm_cache *c, const char *key, uint32_t klen, const char **ptr, uint64_t *vlen,
            shm_item_info *info, uint32_t *pin_id) {
    int r = check_key(c, key, klen);
    if (r < 0 || (r = repair_pending(c)) < 0) return r;
    if (c->slot_id < 0)
        return seg_err(SHM_ENOSLOT, "this process has no slot, so it cannot pin values");
    uint64_t h = idx_hash(key, klen);
    for (int a = 0;; a++) {
        r = pin_once(c, key, klen, h, ptr, vlen, info, pin_id);
        if (r != SHM_EREPAIR) return r;
        if ((r = repaired(c, a)) < 0) return r;
    }
}

int shm_unpin(shm_cache *c, uint32_t pin_id) {
    if (c->slot_id < 0 || (pin_id >> 8) != (uint32_t)c->slot_id + 1)
        return seg_err(SHM_EINVAL, "pin %u was not taken by this process", pin_id);
    pin_id &= PINS_PER_SLOT - 1;
    slot *sl = &c->slots[c->slot_id];
    ref_t ref = LOAD(&sl->pins[pin_id]);
    item *it = ref_item(c, ref);
    if (!it) return seg_err(SHM_EINVAL, "pin %u is not held", pin_id);
    for (int a = 0;; a++) {
        sclass *k;
        int r = class_lock(c, it, &k);
        if (r == SHM_EREPAIR) {
            if ((r = repaired(c, a)) < 0) return r;
            continue;
        }
        if (r < 0) return r;
        /* The table entry is the authority (repair recounts pins from the tables):
         * clear it and drop the count together, under the class lock. */
        if (LOAD(&sl->pins[pin_id]) == ref) {
            STORE(&sl->pins[pin_id], (ref_t)0);
            if (LOAD(&it->pins)) __atomic_sub_fetch(&it->pins, 1, __ATOMIC_ACQ_REL);
            if (LOAD(&it->pins) == 0 && (it->state & IT_STATE_MASK) == IT_ZOMBIE)
                slab_free_locked(c, k, it);
        }
        lock_release(&k->lock);
        return 0;
    }
}
