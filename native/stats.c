/* stats.c - statistics read out of the segment.
 *
 * Counters live in each process's slot, on cache lines of their own, so counting a hit
 * never bounces a line between cores; totals add the live slots to the counters of
 * processes that closed or were reaped.  Memory figures come from the size classes.
 * Reads take no lock: figures are a moment's snapshot, not a transaction.
 */
#include <signal.h>

#include "internal.h"

static void counters_sum(shm_counters *dst, const shm_counters *src) {
    const uint64_t *s = (const uint64_t *)src;
    uint64_t *d = (uint64_t *)dst;
    for (size_t i = 0; i < sizeof *src / 8; i++) d[i] += LOAD_RLX(&s[i]);
}

int shm_stats_get(shm_cache *c, shm_stats *o) {
    memset(o, 0, sizeof *o);
    counters_sum(&o->total, &c->hdr->retired);
    for (uint32_t i = 0; i < c->max_slots; i++) {
        slot *s = &c->slots[i];
        if (LOAD(&s->state) == 1) {
            counters_sum(&o->total, &s->ctr);
            o->live_slots++;
        }
    }
    o->size_bytes = c->size;
    o->data_bytes = c->npages << c->page_shift;
    o->index_buckets = c->nbuckets;
    o->entries = LOAD_RLX(&c->hdr->entries);
    o->max_entries = c->max_entries;
    for (uint32_t i = 0; i <= c->nslab; i++) {
        sclass *k = &c->classes[i];
        o->used_bytes += LOAD_RLX(&k->used_bytes);
        o->payload_bytes += LOAD_RLX(&k->payload_bytes);
        o->free_bytes += LOAD_RLX(&k->free_chunks) * k->chunk;
    }
    o->pages_total = c->npages;
    o->pages_free = LOAD_RLX(&c->pool->free_pages);
    o->free_bytes += o->pages_free << c->page_shift;
    o->journal_bytes = c->jcap;
    if (c->jcap) {
        o->journal_used = LOAD_RLX(&c->jr->head) - LOAD_RLX(&c->jr->tail);
        o->journal_records = LOAD_RLX(&c->jr->records);
        o->journal_dropped = LOAD_RLX(&c->jr->dropped);
    }
    o->generation = c->hdr->generation;
    o->nclasses = c->nslab + 1;
    o->policy = c->policy;
    o->nstripes = c->nstripes;
    o->max_slots = c->max_slots;
    o->page_bytes = c->page_bytes;
    o->max_key_len = c->max_key_len;
    o->max_value_len = c->max_value_len;
    o->fragmentation = o->used_bytes ? 1.0 - (double)o->payload_bytes / (double)o->used_bytes
                                     : 0.0;
    return 0;
}

int shm_class_stats_get(shm_cache *c, uint32_t cls, shm_class_stats *o) {
    if (cls > c->nslab) return seg_err(SHM_EINVAL, "no size class %u", cls);
    sclass *k = &c->classes[cls];
    o->chunk_bytes = k->chunk;
    o->pages = LOAD_RLX(&k->pages);
    o->entries = LOAD_RLX(&k->entries);
    o->used_bytes = LOAD_RLX(&k->used_bytes);
    o->free_bytes = LOAD_RLX(&k->free_chunks) * k->chunk;
    o->payload_bytes = LOAD_RLX(&k->payload_bytes);
    o->evictions = LOAD_RLX(&k->evictions);
    return 0;
}

int shm_slot_stats_get(shm_cache *c, uint32_t i, shm_slot_stats *o) {
    if (i >= c->max_slots) return seg_err(SHM_EINVAL, "no slot %u", i);
    slot *s = &c->slots[i];
    memset(o, 0, sizeof *o);
    o->state = LOAD(&s->state);
    if (!o->state) return 0;
    o->pid = s->pid;
    /* A statistic only (no lock held): reaping decides death more carefully. */
    if (o->pid > 0 && kill(o->pid, 0) != 0 && errno == ESRCH) o->state = 2;
    o->generation = s->generation;
    o->attached_at_ms = s->attached_ms;
    for (uint32_t j = 0; j < PINS_PER_SLOT; j++) o->pins += LOAD_RLX(&s->pins[j]) != 0;
    counters_sum(&o->counters, &s->ctr);
    return 0;
}
