/* evict.c - eviction policies over per-class queues.
 *
 * Each size class keeps its entries in one or two doubly linked queues of refs (head
 * = newest).  Three policies share them:
 *   LRU     one queue; a hit moves the entry to the head, but only if the class lock
 *           is free right now (trylock): a hit never waits for a lock.
 *   SIEVE   one queue; a hit sets a visited bit; a hand walks from the tail toward the
 *           head clearing bits and evicts the first unvisited entry.
 *   S3-FIFO a small FIFO (10% of the class) that filters one-hit wonders, a main FIFO
 *           with 2-bit frequencies (reinsert while freq > 0), and ghost fingerprints of
 *           entries evicted from the small queue so that a quick return goes to main.
 * Under SIEVE and S3-FIFO a hit is one relaxed byte store and takes no lock at all.
 * See docs/eviction.md for the measured hit ratios that chose the default.
 *
 * Everything runs with the class lock held (except ev_hit); index stripes are only
 * trylocked, against the lock order, so eviction can never deadlock.
 */
#include "internal.h"

static inline queue *q_of(sclass *k, const item *it) {
    return &k->q[(it->state & IT_QUEUE1) ? 1 : 0];
}

static void q_push_head(shm_cache *c, queue *q, item *it) {
    ref_t r = item_ref(c, it);
    item *h = ref_item(c, q->head);
    it->prev = 0;
    it->next = h ? q->head : 0;
    if (h) h->prev = r;
    else q->tail = r;
    q->head = r;
    q->count++;
}

static void q_unlink(shm_cache *c, queue *q, item *it) {
    item *p = ref_item(c, it->prev), *n = ref_item(c, it->next);
    if (p) p->next = it->next;
    else q->head = n ? it->next : 0;
    if (n) n->prev = it->prev;
    else q->tail = p ? it->prev : 0;
    it->prev = it->next = 0;
    if (q->count) q->count--;
}

/* ---- ghost fingerprints (S3-FIFO) ---- */

/* Keys recently evicted, as 16-bit tags in 8-way buckets with round-robin replacement
 * (about 2 bytes per cached entry).  Shared by all classes and touched under different
 * class locks at once: every access is a relaxed atomic, and a lost update only costs a
 * ghost hit. */
static inline uint16_t *ghost_bucket(shm_cache *c, uint64_t h, uint16_t *tag) {
    uint16_t t = (uint16_t)h;
    *tag = t ? t : 1;
    uint64_t b = ((h >> 32) * c->nghost) >> 32;
    return &c->ghost[b * 8];
}

void ev_ghost_remember(shm_cache *c, uint64_t h) {
    if (!c->nghost) return;
    uint16_t tag, *g = ghost_bucket(c, h, &tag);
    uint8_t *cur = &c->ghost_cursor[(g - c->ghost) / 8];
    uint8_t i = LOAD_RLX(cur);
    STORE_RLX(&g[i & 7], tag);
    STORE_RLX(cur, (uint8_t)((i + 1) & 7));
}

static int ghost_take(shm_cache *c, uint64_t h) {
    if (!c->nghost) return 0;
    uint16_t tag, *g = ghost_bucket(c, h, &tag);
    for (int i = 0; i < 8; i++)
        if (LOAD_RLX(&g[i]) == tag) {
            STORE_RLX(&g[i], (uint16_t)0);
            return 1;
        }
    return 0;
}

/* S3-FIFO's small queue holds 5% of the class (measured best: docs/eviction.md). */
static inline uint64_t small_target(const sclass *k) {
    uint64_t n = k->q[0].count + k->q[1].count;
    return n / 20 ? n / 20 : 1;
}

static void to_main(shm_cache *c, sclass *k, item *it) {
    q_unlink(c, &k->q[0], it);
    it->state |= IT_QUEUE1;
    q_push_head(c, &k->q[1], it);    /* freq kept */
}

/* ---- insert / remove / hit ---- */

void ev_insert(shm_cache *c, sclass *k, item *it, uint64_t h) {
    it->freq = 0;
    it->state &= (uint8_t)~IT_QUEUE1;
    if (c->policy == SHM_POLICY_S3FIFO && ghost_take(c, h)) it->state |= IT_QUEUE1;
    q_push_head(c, q_of(k, it), it);
    /* While the class has room, the small queue's overflow fills main. */
    if (c->policy == SHM_POLICY_S3FIFO && !k->full)
        for (uint32_t n = 0; n < 4 && k->q[0].count > small_target(k); n++) {
            item *t = ref_item(c, k->q[0].tail);
            if (!t) break;
            to_main(c, k, t);
        }
}

/* Repair: put a surviving entry back on the queue its state bit names. */
void ev_relink(shm_cache *c, sclass *k, item *it) {
    q_push_head(c, q_of(k, it), it);
}

void ev_remove(shm_cache *c, sclass *k, item *it) {
    ref_t r = item_ref(c, it);
    if (k->hand == r) k->hand = it->prev;
    q_unlink(c, q_of(k, it), it);
}

void ev_hit(shm_cache *c, item *it) {
    uint8_t f = LOAD_RLX(&it->freq);
    switch (c->policy) {
    case SHM_POLICY_S3FIFO:
        if (f < 3) STORE_RLX(&it->freq, (uint8_t)(f + 1));
        return;
    case SHM_POLICY_SIEVE:
        if (!f) STORE_RLX(&it->freq, (uint8_t)1);
        return;
    default: {
        /* LRU: promote only if the class lock is free this instant. */
        if (it->cls > c->nslab) return;
        sclass *k = &c->classes[it->cls];
        if (k->q[0].head == item_ref(c, it) || lock_try(c, &k->lock) != 0) return;
        if ((it->state & IT_STATE_MASK) == IT_LINKED) {
            q_unlink(c, &k->q[0], it);
            q_push_head(c, &k->q[0], it);
        }
        lock_release(&k->lock);
    }
    }
}

/* ---- eviction ---- */

/* Remove one specific entry to make room.  0 if it cannot go right now (pinned,
 * not linked, or its index stripe is busy). */
int ev_evict_item(shm_cache *c, sclass *k, item *it, int reason) {
    if (it->pins || (it->state & IT_STATE_MASK) != IT_LINKED || !item_sane(c, it)) return 0;
    uint64_t h = idx_hash(item_key(it), it->klen);
    shm_lock *s = &c->stripes[stripe_of(c, h)];
    if (lock_try(c, s) != 0) return 0;
    if (it->pins || (it->state & IT_STATE_MASK) != IT_LINKED) {
        lock_release(s);
        return 0;
    }
    ref_t r = item_ref(c, it);
    ref_t *link = &c->buckets[h & c->bucket_mask];
    for (uint32_t steps = 0; steps < MAX_CHAIN_STEPS; steps++) {
        ref_t cur = LOAD(link);
        if (cur == 0) break;           /* not indexed: a dead writer's leftover */
        if (cur == r) {
            STORE(link, it->hnext);
            ADD_RLX(&c->hdr->entries, (uint64_t)-1);
            break;
        }
        item *n = ref_item(c, cur);
        if (!n) break;
        link = &n->hnext;
    }
    ev_remove(c, k, it);
    k->entries--;
    k->payload_bytes -= item_total(it);
    k->evictions++;
    k->pressure++;
    ADD_RLX(&c->ctr->evictions[reason], 1);
    if (c->policy == SHM_POLICY_S3FIFO && reason < SHM_REASON_EXPIRED_READ)
        ev_ghost_remember(c, h);
    slab_free_locked(c, k, it);
    lock_release(s);
    return 1;
}

static int evict_lru(shm_cache *c, sclass *k, int reason) {
    queue *q = &k->q[0];
    for (uint32_t t = 0; t < EVICT_TRIES && q->count; t++) {
        item *it = ref_item(c, q->tail);
        if (!it) return 0;
        if (ev_evict_item(c, k, it, reason)) return 1;
        q_unlink(c, q, it);       /* busy: give it another round */
        q_push_head(c, q, it);
    }
    return 0;
}

static int evict_sieve(shm_cache *c, sclass *k, int reason) {
    queue *q = &k->q[0];
    uint64_t limit = 2 * q->count + EVICT_TRIES, fails = 0;
    item *it = ref_item(c, k->hand ? k->hand : q->tail);
    for (uint64_t t = 0; t < limit && q->count; t++) {
        if (!it) it = ref_item(c, q->tail);
        if (!it) return 0;
        ref_t newer = it->prev;
        if (LOAD_RLX(&it->freq)) {
            STORE_RLX(&it->freq, (uint8_t)0);
        } else {
            k->hand = newer;
            if (ev_evict_item(c, k, it, reason)) return 1;
            if (++fails >= EVICT_TRIES) break;
        }
        it = ref_item(c, newer);
        k->hand = newer;
    }
    return 0;
}

/* S3-FIFO-fill: evict from the small queue while it is over 5% (a reused entry moves
 * to main, keeping its frequency), else CLOCK over main (reinsert while freq > 0). */
static int evict_s3fifo(shm_cache *c, sclass *k, int reason) {
    queue *small = &k->q[0], *main = &k->q[1];
    uint64_t limit = 4 * (small->count + main->count) + EVICT_TRIES, fails = 0;
    k->full = 1;
    for (uint64_t t = 0; t < limit && (small->count || main->count); t++) {
        int from_small = small->count && (small->count > small_target(k) || !main->count);
        queue *q = from_small ? small : main;
        item *it = ref_item(c, q->tail);
        if (!it) return 0;
        uint8_t f = LOAD_RLX(&it->freq);
        if (f > 0) {
            if (from_small) {
                to_main(c, k, it);
            } else {
                STORE_RLX(&it->freq, (uint8_t)(f - 1));
                q_unlink(c, main, it);
                q_push_head(c, main, it);
            }
            continue;
        }
        if (ev_evict_item(c, k, it, reason)) return 1;
        q_unlink(c, q, it);
        q_push_head(c, q, it);
        if (++fails >= EVICT_TRIES) break;
    }
    return 0;
}

int ev_evict_one(shm_cache *c, sclass *k, int reason) {
    switch (c->policy) {
    case SHM_POLICY_SIEVE: return evict_sieve(c, k, reason);
    case SHM_POLICY_S3FIFO: return evict_s3fifo(c, k, reason);
    default: return evict_lru(c, k, reason);
    }
}
