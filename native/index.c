/* index.c - the hash index: a bucket array of refs with chains through item.hnext.
 *
 * Buckets are grouped into lock stripes (bucket & (nstripes-1)).  Every change to a
 * chain is a single aligned release-store of one ref, so a chain is well formed at
 * every instant, even when its writer is killed halfway through an operation: the
 * chains are the authoritative record that seg_repair() rebuilds everything else from.
 * Walks are bounded and every ref is range-checked before it is followed.
 */
#include "internal.h"

item *idx_find(shm_cache *c, uint64_t h, const char *key, uint32_t klen, ref_t **linkp,
               int *err) {
    ref_t *link = &c->buckets[h & c->bucket_mask];
    for (uint32_t steps = 0; steps < MAX_CHAIN_STEPS; steps++) {
        ref_t r = LOAD(link);
        if (r == 0) return NULL;
        item *it = ref_item(c, r);
        if (UNLIKELY(!it || !item_sane(c, it))) break;
        if (it->klen == klen && memcmp(item_key(it), key, klen) == 0) {
            *linkp = link;
            return it;
        }
        link = &it->hnext;
    }
    STORE(&c->hdr->needs_repair, 1u);
    *err = seg_err(SHM_ECORRUPT, "index chain of bucket %llu is damaged; repair scheduled",
                   (unsigned long long)(h & c->bucket_mask));
    return NULL;
}

void idx_remove_locked(shm_cache *c, sclass *k, ref_t *link, item *it) {
    STORE(link, it->hnext);
    ADD_RLX(&c->hdr->entries, (uint64_t)-1);
    ev_remove(c, k, it);
    k->entries--;
    k->payload_bytes -= item_total(it);
    if (LOAD(&it->pins)) {
        it->state = (uint8_t)((it->state & ~IT_STATE_MASK) | IT_ZOMBIE);
        return;
    }
    slab_free_locked(c, k, it);
}
