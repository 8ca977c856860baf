/* slab.c - the allocator, entirely inside the segment.
 *
 * The data area is cut into equal pages (64 KiB by default).  A page is either free,
 * owned by one size class (jemalloc-style classes, four per doubling, from 64 bytes to
 * half a page) and cut into equal chunks, or part of a run of consecutive pages that
 * holds one large value.  Each slab page keeps its own free list and free count; a class
 * keeps a list of its pages that have free chunks.  Everything here is derived state:
 * seg_repair() rebuilds it from the page map and the item headers.
 *
 * Memory is never wiped wholesale.  A class that runs dry evicts its own coldest
 * entries; one that keeps evicting while others sit still takes a page from the class
 * that evicts least (the page holding that class's oldest entry is evacuated), so one
 * burst of large values cannot starve a size class for good.
 *
 * Locks: the caller's class lock is held throughout; the pool lock nests inside it;
 * other classes' locks and index stripes are only ever trylocked from here.
 */
#include "internal.h"

void slab_init_classes(shm_cache *c) {
    for (uint32_t i = 0; i <= c->nslab; i++) {
        sclass *k = &c->classes[i];
        k->chunk = i < c->nslab ? c->class_size[i] : 0;
        k->per_page = i < c->nslab ? c->page_bytes / k->chunk : 0;
    }
}

int slab_class_for(shm_cache *c, uint64_t total) {
    uint32_t lo = 0, hi = c->nslab;
    if (total > c->class_size[c->nslab - 1]) return (int)c->nslab;
    while (lo < hi) {
        uint32_t mid = (lo + hi) / 2;
        if (c->class_size[mid] < total) lo = mid + 1;
        else hi = mid;
    }
    return (int)lo;
}

uint64_t slab_chunk_bytes(shm_cache *c, const item *it) {
    uint64_t idx = page_index(c, it);
    if (idx >= c->npages) return 0;
    uint8_t pc = c->pages[idx].cls;
    if (pc < c->nslab) return c->class_size[pc];
    if (pc == c->nslab) {
        uint64_t run = c->pages[idx].run;
        if (run == 0 || run > c->npages - idx) return 0;
        return run << c->page_shift;
    }
    return 0;
}

/* ---- class partial-page list ---- */

static void partial_push(shm_cache *c, sclass *k, uint64_t idx) {
    page *p = &c->pages[idx];
    p->prev = 0;
    p->next = k->partial;
    if (k->partial && k->partial <= c->npages) c->pages[k->partial - 1].prev = (uint32_t)idx + 1;
    k->partial = (uint32_t)idx + 1;
}

static void partial_remove(shm_cache *c, sclass *k, uint64_t idx) {
    page *p = &c->pages[idx];
    if (p->prev && p->prev <= c->npages) c->pages[p->prev - 1].next = p->next;
    else if (k->partial == idx + 1) k->partial = p->next;
    if (p->next && p->next <= c->npages) c->pages[p->next - 1].prev = p->prev;
    p->next = p->prev = 0;
}

/* ---- page pool ---- */

static int pool_lock(shm_cache *c) {
    int r = lock_acquire(c, &c->pool->lock, "page pool");
    if (r == LOCK_REPAIR) {
        /* Pool state is a count and a hint; both are checked on use and rebuilt by
         * the repair the flag now asks for.  Safe to go on. */
        r = 0;
    }
    return r;
}

/* Find n consecutive free pages (pool lock held); returns index or npages. */
static uint64_t pool_find_run(shm_cache *c, uint64_t n) {
    uint64_t np = c->npages, start = n == 1 ? c->pool->hint % np : 0;
    uint64_t run = 0;
    for (uint64_t scanned = 0; scanned < np + n; scanned++) {
        uint64_t i = (start + scanned) % np;
        if (i == 0) run = 0;   /* runs do not wrap around the end */
        if (c->pages[i].cls == PG_FREE) {
            if (++run == n) return i + 1 - n;
        } else {
            run = 0;
        }
    }
    return np;
}

static uint64_t pool_take(shm_cache *c, uint64_t n, uint8_t cls) {
    if (pool_lock(c) < 0) return c->npages;
    uint64_t idx = LOAD_RLX(&c->pool->free_pages) >= n ? pool_find_run(c, n) : c->npages;
    if (idx < c->npages) {
        for (uint64_t i = 0; i < n; i++) {
            page *p = &c->pages[idx + i];
            memset(p, 0, sizeof(*p));
            p->cls = i == 0 ? cls : PG_LARGE_CONT;
        }
        c->pages[idx].run = (uint32_t)n;
        STORE_RLX(&c->pool->free_pages, c->pool->free_pages - n);
        c->pool->hint = idx + n;
    }
    lock_release(&c->pool->lock);
    return idx;
}

static void pool_give(shm_cache *c, uint64_t idx, uint64_t n) {
    int r = pool_lock(c);
    for (uint64_t i = 0; i < n; i++) {
        page *p = &c->pages[idx + i];
        memset(p, 0, sizeof(*p));
        p->cls = PG_FREE;
    }
    if (r == 0) {
        STORE_RLX(&c->pool->free_pages, c->pool->free_pages + n);
        if (idx < c->pool->hint) c->pool->hint = idx;
        lock_release(&c->pool->lock);
    }
}

/* Give class k one more page, cut into free chunks.  0 on success. */
static int page_take(shm_cache *c, sclass *k, uint32_t ki) {
    uint64_t idx = pool_take(c, 1, (uint8_t)ki);
    if (idx >= c->npages) return -1;
    page *p = &c->pages[idx];
    uint8_t *base = page_addr(c, idx);
    ref_t prev = 0;
    for (uint32_t i = k->per_page; i-- > 0;) {
        item *it = (item *)(base + (uint64_t)i * k->chunk);
        memset(it, 0, sizeof(*it));
        it->state = IT_FREE;
        it->cls = (uint8_t)ki;
        it->next = prev;
        prev = item_ref(c, it);
    }
    p->freelist = prev;
    p->nfree = (uint16_t)k->per_page;
    p->run = 1;
    partial_push(c, k, idx);
    k->pages++;
    k->free_chunks += k->per_page;
    k->pressure = 0;
    k->full = 0;
    return 0;
}

/* Return a wholly free slab page to the pool. */
static void page_release(shm_cache *c, sclass *k, uint64_t idx) {
    partial_remove(c, k, idx);
    k->pages--;
    k->free_chunks -= k->per_page;
    pool_give(c, idx, 1);
}

static item *chunk_pop(shm_cache *c, sclass *k, int *err) {
    while (k->partial) {
        uint64_t idx = (uint64_t)k->partial - 1;
        if (idx >= c->npages) goto corrupt;
        page *p = &c->pages[idx];
        item *it = ref_item(c, p->freelist);
        if (!it || p->nfree == 0 || it->state != IT_FREE || page_index(c, it) != idx)
            goto corrupt;
        p->freelist = it->next;
        p->nfree--;
        k->free_chunks--;
        if (p->nfree == 0) partial_remove(c, k, idx);
        return it;
    }
    return NULL;
corrupt:
    STORE(&c->hdr->needs_repair, 1u);
    *err = seg_err(SHM_ECORRUPT, "size class %u free list is damaged; repair scheduled",
                   (unsigned)(k - c->classes));
    return NULL;
}

void slab_free_locked(shm_cache *c, sclass *k, item *it) {
    uint64_t idx = page_index(c, it);
    if (k == &c->classes[c->nslab]) {
        uint64_t run = c->pages[idx].run;
        it->state = IT_FREE;
        k->used_bytes -= run << c->page_shift;
        k->pages -= (uint32_t)run;
        pool_give(c, idx, run);
        return;
    }
    page *p = &c->pages[idx];
    it->state = IT_FREE;
    it->next = p->freelist;
    p->freelist = item_ref(c, it);
    p->nfree++;
    k->free_chunks++;
    k->used_bytes -= k->chunk;
    if (p->nfree == 1) partial_push(c, k, idx);
    /* Keep one partly free page per class as a buffer against page churn. */
    if (p->nfree == k->per_page && (p->next || p->prev)) page_release(c, k, idx);
}

/* Evict every entry on slab page idx of class k (lock held).  1 if the page went back
 * to the pool, 0 if something on it could not be moved (pinned, being written, or its
 * stripe busy); what could be evicted still was. */
static int page_evacuate(shm_cache *c, sclass *k, uint64_t idx, int reason) {
    uint8_t ki = (uint8_t)(k - c->classes);
    uint8_t *base = page_addr(c, idx);
    for (uint32_t i = 0; i < k->per_page; i++) {
        /* Freeing the page's last entry hands the page to the pool, where another
         * process may take it at once: from then on its chunks are not ours to read. */
        if (c->pages[idx].cls != ki) return 1;
        item *it = (item *)(base + (uint64_t)i * k->chunk);
        if ((it->state & IT_STATE_MASK) == IT_LINKED) ev_evict_item(c, k, it, reason);
    }
    if (c->pages[idx].cls != ki) return 1;
    if (c->pages[idx].nfree != k->per_page) return 0;
    page_release(c, k, idx);
    return 1;
}

/* The page of a class's coldest entry: what rebalancing evacuates. */
static uint64_t coldest_page(shm_cache *c, sclass *k) {
    ref_t r = k->q[1].count ? k->q[1].tail : k->q[0].tail;
    item *it = ref_item(c, r);
    return it ? page_index(c, it) : c->npages;
}

/* Take memory from one donor class (locked by the caller): 1 if something was freed. */
static int donate(shm_cache *c, sclass *d) {
    if (d == &c->classes[c->nslab]) return ev_evict_one(c, d, SHM_REASON_REBALANCE);
    uint64_t idx = coldest_page(c, d);
    if (idx < c->npages && c->pages[idx].cls == (uint8_t)(d - c->classes))
        return page_evacuate(c, d, idx, SHM_REASON_REBALANCE);
    return 0;
}

/* Move memory from the classes that evict least to class k, trying donors in that
 * order (a donor may be busy, or its coldest page pinned).  Only trylocks. */
static int steal_page(shm_cache *c, sclass *k) {
    uint8_t tried[SHM_MAX_CLASSES + 1] = {0};
    for (int attempt = 0; attempt < 4; attempt++) {
        sclass *best = NULL;
        for (uint32_t i = 0; i <= c->nslab; i++) {
            sclass *d = &c->classes[i];
            if (tried[i] || d == k || d->pages == 0 || (d->pages < 2 && i < c->nslab)) continue;
            if (d->q[0].count + d->q[1].count == 0 && d->free_chunks == 0) continue;
            if (!best || d->pressure < best->pressure ||
                (d->pressure == best->pressure && d->pages > best->pages))
                best = d;
        }
        if (!best) return -1;
        tried[best - c->classes] = 1;
        if (lock_try(c, &best->lock) != 0) continue;
        int freed = donate(c, best);
        lock_release(&best->lock);
        if (freed) return 0;
    }
    return -1;
}

/* Free a run of n pages for a large value by evacuating the window of slab pages that
 * holds the fewest live chunks (windows crossing another large run are skipped). */
static int make_run(shm_cache *c, uint64_t n) {
    if (n > c->npages) return 0;
    uint64_t best = c->npages, best_cost = UINT64_MAX, cost = 0, blocked = 0;
    for (uint64_t i = 0; i < c->npages; i++) {
        page *p = &c->pages[i];
        uint64_t pc = p->cls == PG_FREE ? 0 : p->cls < c->nslab
                      ? c->classes[p->cls].per_page - p->nfree : UINT32_MAX;
        if (pc == UINT32_MAX) blocked++;
        else cost += pc;
        if (i >= n) {
            page *o = &c->pages[i - n];
            uint64_t oc = o->cls == PG_FREE ? 0 : o->cls < c->nslab
                          ? c->classes[o->cls].per_page - o->nfree : UINT32_MAX;
            if (oc == UINT32_MAX) blocked--;
            else cost -= oc;
        }
        if (i + 1 >= n && !blocked && cost < best_cost) {
            best_cost = cost;
            best = i + 1 - n;
        }
    }
    if (best >= c->npages) return 0;
    int all = 1;
    for (uint64_t i = best; i < best + n; i++) {
        uint8_t pc = c->pages[i].cls;
        if (pc == PG_FREE) continue;
        if (pc >= c->nslab) return 0;
        sclass *d = &c->classes[pc];
        if (lock_try(c, &d->lock) != 0) {
            all = 0;
            continue;
        }
        if (c->pages[i].cls == pc) all &= page_evacuate(c, d, i, SHM_REASON_REBALANCE);
        lock_release(&d->lock);
    }
    return all;
}

/* Large values: a run of whole pages, class nslab, lock held.  The class evicts its
 * own entries, but after a few evictions without growing (or with nothing of its own
 * left) it wins pages back from the slab classes, so it can grow with demand. */
static item *large_alloc(shm_cache *c, sclass *k, uint64_t total, int *err) {
    uint64_t n = (total + c->page_bytes - 1) >> c->page_shift;
    for (uint32_t tries = 0; tries < 1024; tries++) {
        uint64_t idx = pool_take(c, n, (uint8_t)c->nslab);
        if (idx < c->npages) {
            item *it = (item *)page_addr(c, idx);
            memset(it, 0, sizeof(*it));
            it->cls = (uint8_t)c->nslab;
            k->pages += (uint32_t)n;
            k->used_bytes += n << c->page_shift;
            return it;
        }
        int own = k->q[0].count + k->q[1].count > 0;
        if (!own || k->pressure >= 4) {
            k->pressure = 0;
            if (make_run(c, n)) continue;
        }
        if (own && ev_evict_one(c, k, SHM_REASON_CAPACITY)) continue;
        if (!make_run(c, n)) break;
    }
    *err = seg_err(SHM_EFULL, "no run of %llu free pages for a %llu-byte value, even after "
                   "eviction (pinned or in-flight entries may hold the memory)",
                   (unsigned long long)n, (unsigned long long)total);
    return NULL;
}

/* Respect max_entries: evict from k, or from any class we can trylock. */
static void enforce_entries(shm_cache *c, sclass *k) {
    for (uint32_t tries = 0; tries < 8; tries++) {
        if (!c->max_entries || LOAD_RLX(&c->hdr->entries) < c->max_entries) return;
        if (k->q[0].count + k->q[1].count && ev_evict_one(c, k, SHM_REASON_ENTRIES)) continue;
        for (uint32_t i = 0; i <= c->nslab; i++) {
            sclass *d = &c->classes[i];
            if (d == k || d->q[0].count + d->q[1].count == 0) continue;
            if (lock_try(c, &d->lock) != 0) continue;
            ev_evict_one(c, d, SHM_REASON_ENTRIES);
            lock_release(&d->lock);
            break;
        }
    }
}

item *slab_alloc(shm_cache *c, uint64_t total, int *err) {
    int ki = slab_class_for(c, total);
    sclass *k = &c->classes[ki];
    int r = lock_acquire(c, &k->lock, "size class");
    if (r < 0) {
        *err = r;
        return NULL;
    }
    if (r == LOCK_REPAIR) {
        lock_release(&k->lock);
        *err = LOCK_REPAIR;
        return NULL;
    }
    enforce_entries(c, k);
    item *it = NULL;
    if (ki == (int)c->nslab) {
        it = large_alloc(c, k, total, err);
    } else {
        for (uint32_t tries = 0; tries < EVICT_TRIES * 4 && !it; tries++) {
            it = chunk_pop(c, k, err);
            if (it || *err) break;
            if (page_take(c, k, (uint32_t)ki) == 0) continue;
            int empty = k->q[0].count + k->q[1].count == 0;
            if (empty || k->pressure >= 2ull * k->per_page) {
                k->pressure = 0;   /* try again only after as many evictions */
                if (steal_page(c, k) == 0) {
                    page_take(c, k, (uint32_t)ki);
                    continue;
                }
            }
            if (empty || !ev_evict_one(c, k, SHM_REASON_CAPACITY)) break;
        }
        if (!it && !*err)
            *err = seg_err(SHM_EFULL, "segment full: no %u-byte chunk free even after "
                           "eviction (pinned or in-flight entries may hold the memory)",
                           k->chunk);
        if (it) k->used_bytes += k->chunk;
    }
    if (it) {
        it->state = IT_RESERVED;
        it->owner = (uint16_t)(c->slot_id < 0 ? 0xffff : c->slot_id);
        it->cls = (uint8_t)ki;
        it->pins = 0;
        it->freq = 0;
        it->prev = it->next = it->hnext = 0;
    }
    lock_release(&k->lock);
    return it;
}

/* Take a class lock when no other segment lock is held: a lock its dead holder left
 * behind is repaired first (the class's lists may be half-changed), then retaken. */
static int class_lock_repaired(shm_cache *c, sclass *k) {
    for (int attempt = 0;; attempt++) {
        int r = lock_acquire(c, &k->lock, "size class");
        if (r != LOCK_REPAIR) return r;
        lock_release(&k->lock);
        if (attempt >= 4)
            return seg_err(SHM_ECORRUPT, "size class still inconsistent after repairs");
        if ((r = seg_repair(c, 1)) < 0) return r;
    }
}

/* Give back a reserved chunk that was never published (takes the class lock). */
int slab_free_reserved(shm_cache *c, item *it) {
    sclass *k = &c->classes[it->cls <= c->nslab ? it->cls : 0];
    int r = class_lock_repaired(c, k);
    if (r < 0) return r;
    if ((it->state & IT_STATE_MASK) == IT_RESERVED) slab_free_locked(c, k, it);
    lock_release(&k->lock);
    return 0;
}

/* Return every wholly free slab page to the pool (after clear: memory is not kept
 * by the classes that happened to use it). */
int slab_trim(shm_cache *c) {
    for (uint32_t i = 0; i < c->nslab; i++) {
        sclass *k = &c->classes[i];
        int r = class_lock_repaired(c, k);
        if (r < 0) return r;
        uint32_t pi = k->partial;
        for (uint64_t steps = 0; pi && pi <= c->npages && steps <= c->npages; steps++) {
            uint32_t next = c->pages[pi - 1].next;
            if (c->pages[pi - 1].nfree == k->per_page) page_release(c, k, pi - 1);
            pi = next;
        }
        k->full = 0;
        lock_release(&k->lock);
    }
    return 0;
}
