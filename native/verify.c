/* verify.c - the integrity checker.
 *
 * Takes every lock in order, walks the whole segment and reports each broken invariant
 * as one line: header against this handle's view, page map, every index chain, every
 * policy queue, every slab page's free list, pins against the slots' tables, the
 * counters, and the journal.  It changes nothing (the scratch mark bit it uses is
 * cleared before it returns).  Tests call it after every fault they inject.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "internal.h"

typedef struct vr {
    char *p;
    uint64_t cap;
    int n;
} vr;

__attribute__((format(printf, 2, 3))) static void bad(vr *v, const char *fmt, ...) {
    v->n++;
    if (v->cap <= 1) return;
    va_list ap;
    va_start(ap, fmt);
    int w = vsnprintf(v->p, v->cap, fmt, ap);
    va_end(ap);
    if (w < 0) return;
    if ((uint64_t)w + 1 >= v->cap) {
        v->p += v->cap - 1;
        v->cap = 1;
        return;
    }
    v->p[w] = '\n';
    v->p[w + 1] = 0;
    v->p += w + 1;
    v->cap -= (uint64_t)w + 1;
}

static void check_header(shm_cache *c, vr *v) {
    seg_header *h = c->hdr;
    if (h->magic != SEG_MAGIC) bad(v, "header: magic overwritten");
    if (h->layout_version != SEG_LAYOUT_VERSION) bad(v, "header: layout version changed");
    if (h->size_bytes != c->size) bad(v, "header: size field changed");
    if (h->nbuckets != c->nbuckets || h->npages != c->npages || h->off_data != c->data_off ||
        h->off_buckets != (uint64_t)((uint8_t *)c->buckets - c->base))
        bad(v, "header: layout fields changed since attach");
    if (memcmp(&h->cfg, &c->cfg, sizeof c->cfg) != 0) bad(v, "header: configuration changed");
}

static void check_pages(shm_cache *c, vr *v) {
    uint64_t free_pages = 0;
    for (uint64_t i = 0; i < c->npages;) {
        page *p = &c->pages[i];
        if (p->cls == PG_FREE) {
            free_pages++;
            i++;
        } else if (p->cls < c->nslab) {
            i++;
        } else if (p->cls == c->nslab) {
            uint64_t run = p->run;
            if (run == 0 || run > c->npages - i) {
                bad(v, "page %llu: large run of %llu pages overruns the data area",
                    (unsigned long long)i, (unsigned long long)run);
                i++;
                continue;
            }
            for (uint64_t j = 1; j < run; j++)
                if (c->pages[i + j].cls != PG_LARGE_CONT)
                    bad(v, "page %llu: not marked as part of the run at page %llu",
                        (unsigned long long)(i + j), (unsigned long long)i);
            i += run;
        } else {
            bad(v, "page %llu: %s code 0x%02x", (unsigned long long)i,
                p->cls == PG_LARGE_CONT ? "stray run continuation" : "invalid page",
                p->cls);
            i++;
        }
    }
    if (free_pages != c->pool->free_pages)
        bad(v, "pool: %llu free pages counted, pool says %llu",
            (unsigned long long)free_pages, (unsigned long long)c->pool->free_pages);
}

/* Marks indexed items; returns how many. */
static uint64_t check_index(shm_cache *c, vr *v) {
    uint64_t n = 0;
    for (uint64_t b = 0; b < c->nbuckets; b++) {
        ref_t r = c->buckets[b];
        uint32_t steps = 0;
        for (; r && steps < MAX_CHAIN_STEPS; steps++) {
            item *it = ref_item(c, r);
            uint64_t chunk = it ? slab_chunk_bytes(c, it) : 0;
            if (!it || !chunk) {
                bad(v, "bucket %llu: ref %u points outside any allocated chunk",
                    (unsigned long long)b, r);
                break;
            }
            if (it->state & IT_MARK) {
                bad(v, "bucket %llu: entry at ref %u reached twice (cycle or shared chain)",
                    (unsigned long long)b, r);
                break;
            }
            if (!item_sane(c, it) || item_total(it) > chunk || it->klen == 0) {
                bad(v, "bucket %llu: entry at ref %u has lengths beyond its chunk",
                    (unsigned long long)b, r);
                break;
            }
            uint64_t pidx = page_index(c, it);
            uint8_t pc = c->pages[pidx].cls;
            uint64_t rel = (uint64_t)((uint8_t *)it - page_addr(c, pidx));
            if (pc < c->nslab ? rel % c->class_size[pc] != 0 : rel != 0)
                bad(v, "bucket %llu: entry at ref %u is not at a chunk boundary",
                    (unsigned long long)b, r);
            if ((it->state & IT_STATE_MASK) != IT_LINKED)
                bad(v, "bucket %llu: indexed entry at ref %u has state %u",
                    (unsigned long long)b, r, it->state & IT_STATE_MASK);
            if (it->cls != pc)
                bad(v, "entry at ref %u: class %u but its page belongs to %u", r, it->cls, pc);
            if ((idx_hash(item_key(it), it->klen) & c->bucket_mask) != b)
                bad(v, "entry at ref %u is in bucket %llu but hashes elsewhere", r,
                    (unsigned long long)b);
            if (hash_item_csum(it) != it->csum)
                bad(v, "entry at ref %u: checksum mismatch (value or key damaged)", r);
            it->state |= IT_MARK;
            n++;
            r = it->hnext;
        }
        if (steps >= MAX_CHAIN_STEPS) bad(v, "bucket %llu: chain too long (cycle)",
                                          (unsigned long long)b);
    }
    return n;
}

static void check_queues(shm_cache *c, vr *v, uint64_t *entries, uint64_t *payload) {
    for (uint32_t ci = 0; ci <= c->nslab; ci++) {
        sclass *k = &c->classes[ci];
        uint64_t ents = 0, pay = 0;
        for (int qi = 0; qi < 2; qi++) {
            queue *q = &k->q[qi];
            ref_t r = q->head, prev = 0;
            uint64_t n = 0;
            for (; r && n <= q->count; n++) {
                item *it = ref_item(c, r);
                if (!it) {
                    bad(v, "class %u queue %d: ref %u outside the data area", ci, qi, r);
                    break;
                }
                if (it->prev != prev)
                    bad(v, "class %u queue %d: back link of ref %u is %u, expected %u", ci,
                        qi, r, it->prev, prev);
                if (!(it->state & IT_MARK))
                    bad(v, "class %u queue %d: entry at ref %u is queued but not indexed", ci,
                        qi, r);
                if (((it->state & IT_QUEUE1) ? 1 : 0) != qi || it->cls != ci)
                    bad(v, "class %u queue %d: entry at ref %u belongs elsewhere", ci, qi, r);
                if (item_sane(c, it)) pay += item_total(it);
                it->state |= IT_SEEN;   /* seen in a queue (cleared below) */
                prev = r;
                r = it->next;
            }
            if (n != q->count || (r && n > q->count))
                bad(v, "class %u queue %d: %llu entries linked, count says %llu", ci, qi,
                    (unsigned long long)n, (unsigned long long)q->count);
            if (q->tail != prev) bad(v, "class %u queue %d: tail is wrong", ci, qi);
            ents += n;
        }
        if (ents != k->entries)
            bad(v, "class %u: %llu entries queued, class says %llu", ci,
                (unsigned long long)ents, (unsigned long long)k->entries);
        if (pay != k->payload_bytes)
            bad(v, "class %u: %llu payload bytes queued, class says %llu", ci,
                (unsigned long long)pay, (unsigned long long)k->payload_bytes);
        *entries += ents;
        *payload += pay;
    }
}

typedef struct pagecheck {
    vr *v;
    uint64_t used[SHM_MAX_CLASSES + 1];
    uint64_t free_chunks[SHM_MAX_CLASSES + 1];
    uint32_t pages[SHM_MAX_CLASSES + 1];
} pagecheck;

static void check_slab_page(shm_cache *c, uint64_t i, pagecheck *pc) {
    page *p = &c->pages[i];
    sclass *k = &c->classes[p->cls];
    vr *v = pc->v;
    uint32_t nfree = 0;
    ref_t r = p->freelist;
    for (; r && nfree <= k->per_page; nfree++) {
        item *it = ref_item(c, r);
        if (!it || page_index(c, it) != i) {
            bad(v, "page %llu: free list leaves the page", (unsigned long long)i);
            break;
        }
        if ((it->state & IT_STATE_MASK) != IT_FREE)
            bad(v, "page %llu: chunk ref %u on the free list is in use", (unsigned long long)i,
                r);
        r = it->next;
    }
    if (nfree != p->nfree)
        bad(v, "page %llu: free list has %u chunks, page says %u", (unsigned long long)i,
            nfree, p->nfree);
    for (uint32_t j = 0; j < k->per_page; j++) {
        item *it = (item *)(page_addr(c, i) + (uint64_t)j * k->chunk);
        uint8_t st = it->state & IT_STATE_MASK;
        if (st == IT_LINKED && !(it->state & IT_MARK))
            bad(v, "page %llu: linked entry at ref %u is not in the index",
                (unsigned long long)i, item_ref(c, it));
        if ((it->state & IT_MARK) && !(it->state & IT_SEEN))
            bad(v, "page %llu: indexed entry at ref %u is in no queue", (unsigned long long)i,
                item_ref(c, it));
        if (st > IT_ZOMBIE)
            bad(v, "page %llu: chunk ref %u has invalid state %u", (unsigned long long)i,
                item_ref(c, it), st);
    }
    pc->used[p->cls] += (uint64_t)(k->per_page - p->nfree) * k->chunk;
    pc->free_chunks[p->cls] += p->nfree;
    pc->pages[p->cls]++;
}

/* Runs under every segment lock: its scratch table lives on the stack (no malloc). */
static void check_memory(shm_cache *c, vr *v) {
    pagecheck pcs;
    pagecheck *pc = &pcs;
    memset(pc, 0, sizeof *pc);
    pc->v = v;
    for (uint64_t i = 0; i < c->npages;) {
        page *p = &c->pages[i];
        if (p->cls < c->nslab) {
            check_slab_page(c, i, pc);
            i++;
        } else if (p->cls == c->nslab && p->run && p->run <= c->npages - i) {
            item *it = (item *)page_addr(c, i);
            if ((it->state & IT_STATE_MASK) == IT_LINKED && !(it->state & IT_MARK))
                bad(v, "page %llu: large entry is not in the index", (unsigned long long)i);
            pc->used[c->nslab] += (uint64_t)p->run << c->page_shift;
            pc->pages[c->nslab] += p->run;
            i += p->run;
        } else {
            i++;
        }
    }
    for (uint32_t ci = 0; ci <= c->nslab; ci++) {
        sclass *k = &c->classes[ci];
        if (pc->used[ci] != k->used_bytes)
            bad(v, "class %u: %llu bytes in use on its pages, class says %llu", ci,
                (unsigned long long)pc->used[ci], (unsigned long long)k->used_bytes);
        if (pc->pages[ci] != k->pages)
            bad(v, "class %u: owns %u pages, class says %u", ci, pc->pages[ci], k->pages);
        if (ci < c->nslab && pc->free_chunks[ci] != k->free_chunks)
            bad(v, "class %u: %llu free chunks on its pages, class says %llu", ci,
                (unsigned long long)pc->free_chunks[ci], (unsigned long long)k->free_chunks);
        uint64_t partial = 0;
        for (uint32_t pi = k->partial; pi && partial <= c->npages; partial++) {
            if (pi > c->npages || c->pages[pi - 1].cls != ci || !c->pages[pi - 1].nfree) {
                bad(v, "class %u: partial-page list holds a page that is not its partial page",
                    ci);
                break;
            }
            pi = c->pages[pi - 1].next;
        }
    }
}

static void check_pins(shm_cache *c, vr *v) {
    for (uint32_t s = 0; s < c->max_slots; s++) {
        slot *sl = &c->slots[s];
        for (uint32_t i = 0; i < PINS_PER_SLOT; i++) {
            ref_t r = sl->pins[i];
            if (!r) continue;
            item *it = ref_item(c, r);
            if (sl->state != 1 || !it) {
                bad(v, "slot %u: pin %u refers to %s", s, i,
                    it ? "an entry but the slot is free" : "nothing valid");
                continue;
            }
            uint8_t st = it->state & IT_STATE_MASK;
            if (st != IT_LINKED && st != IT_ZOMBIE)
                bad(v, "slot %u: pinned ref %u is in state %u", s, r, st);
        }
    }
}

static void clear_marks(shm_cache *c) {
    for (uint64_t b = 0; b < c->nbuckets; b++) {
        ref_t r = c->buckets[b];
        for (uint32_t steps = 0; r && steps < MAX_CHAIN_STEPS; steps++) {
            item *it = ref_item(c, r);
            if (!it || !(it->state & IT_SCRATCH)) break;
            it->state &= (uint8_t)~IT_SCRATCH;
            r = it->hnext;
        }
    }
    for (uint32_t ci = 0; ci <= c->nslab; ci++)
        for (int qi = 0; qi < 2; qi++) {
            ref_t r = c->classes[ci].q[qi].head;
            for (uint64_t n = 0; r && n <= c->classes[ci].q[qi].count; n++) {
                item *it = ref_item(c, r);
                if (!it) break;
                it->state &= (uint8_t)~IT_SCRATCH;
                r = it->next;
            }
        }
}

int shm_verify(shm_cache *c, char *report, uint64_t cap) {
    vr v = {report, cap, 0};
    if (report && cap) report[0] = 0;
    held h = {seg_lock_array(c), 0};
    if (!h.locks) return seg_err(SHM_ENOMEM, "out of memory for verify");
    int rc = lock_acquire(c, &c->hdr->slot_lock, "slot table");
    if (rc < 0) {
        free(h.locks);
        return rc;
    }
    h.locks[h.n++] = &c->hdr->slot_lock;
    rc = seg_lock_rest(c, &h);
    if (rc < 0) {
        seg_unlock_all(&h);
        free(h.locks);
        return rc;
    }
    seg_clear_scratch(c);   /* a killed verify or repair may have left some set */
    check_header(c, &v);
    check_pages(c, &v);
    uint64_t indexed = check_index(c, &v), queued = 0, payload = 0;
    check_queues(c, &v, &queued, &payload);
    check_memory(c, &v);
    check_pins(c, &v);
    if (indexed != c->hdr->entries)
        bad(&v, "index holds %llu entries, segment counter says %llu",
            (unsigned long long)indexed, (unsigned long long)c->hdr->entries);
    if (c->jcap) {
        char *p = v.p;
        uint64_t left = v.cap;
        v.n += jr_check(c, &p, &left);
        v.p = p;
        v.cap = left;
    }
    if (LOAD(&c->hdr->needs_repair)) bad(&v, "segment is flagged for repair (a process died "
                                         "holding a lock); run reap()");
    clear_marks(c);
    seg_unlock_all(&h);
    free(h.locks);
    return v.n;
}
