/* slots.c - process slots, fork handling, reaping and repair.
 *
 * Every attached process owns a slot: its pid and /proc start time (so a reused pid is
 * not mistaken for the original), a robust mutex its attaching thread holds for life
 * (the liveness token), its own statistics counters and its table of pinned entries.
 * A pthread_atfork child handler gives a forked child a fresh slot for each handle.
 *
 * seg_repair() is the one place that fixes a segment after a process died: it takes
 * every lock in order (slot table, all stripes, all classes, pool, journal), keeps the
 * index chains and item headers as the authoritative record, and rebuilds everything
 * derived from them: queues, free lists, page ownership, counts and pins.  Entries that
 * a dead process was writing (reserved, never published) are freed; its pins are
 * released; damaged chains are cut rather than followed.  It runs when a lock was found
 * owner-dead, when a dead slot is found (attach, reap, slot exhaustion), or on request.
 */
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

/* ---- process liveness ---- */

/* Reads state and start time from /proc/<pid>/stat.  0 if the process is gone. */
static int proc_stat(pid_t pid, char *state, uint64_t *start) {
    char path[32] = "/proc/", *p = path + 6, digits[16];
    int n = 0;
    for (unsigned v = (unsigned)pid; v || !n; v /= 10) digits[n++] = (char)('0' + v % 10);
    while (n) *p++ = digits[--n];
    memcpy(p, "/stat", 6);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    char buf[1024];
    ssize_t len = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (len <= 0) return 0;
    buf[len] = 0;
    char *s = strrchr(buf, ')');
    if (!s || s[1] != ' ') return 0;
    s += 2;
    *state = *s;
    for (int field = 3; field < 22 && *s; s++)
        if (*s == ' ') field++;
    *start = strtoull(s, NULL, 10);
    return 1;
}

static uint64_t my_starttime(void) {
    char st;
    uint64_t t = 0;
    return proc_stat(getpid(), &st, &t) ? t : 0;
}

/* No locks held: may do /proc I/O. */
static int proc_dead(pid_t pid, uint64_t starttime) {
    char st;
    uint64_t t;
    if (pid <= 0) return 1;
    if (!proc_stat(pid, &st, &t)) return 1;
    if (st == 'Z' || st == 'X') return 1;
    return starttime && t != starttime;
}

/* ---- claiming and releasing ---- */

static int claim_locked(shm_cache *c, uint64_t start) {
    for (uint32_t i = 0; i < c->max_slots; i++) {
        slot *s = &c->slots[i];
        if (s->state != 0) continue;
        /* A free slot's mutex has no legitimate holder: if scribbled, make it anew. */
        if (lock_damaged(&s->live) && lock_init(&s->live, i) < 0) continue;
        int rc = pthread_mutex_trylock(&s->live.m);
        if (rc == EOWNERDEAD) pthread_mutex_consistent(&s->live.m);
        else if (rc != 0) continue;
        s->live.holder_pid = c->pid;
        s->pid = c->pid;
        s->starttime = start;
        s->generation++;
        s->attached_ms = seg_now(c);
        memset(&s->ctr, 0, sizeof s->ctr);
        memset(s->pins, 0, sizeof s->pins);
        STORE(&s->state, 1u);
        c->slot_id = (int)i;
        c->ctr = &s->ctr;
        return 0;
    }
    return -1;
}

int slot_claim(shm_cache *c) {
    uint64_t start = my_starttime();
    c->pid = getpid();
    for (int attempt = 0; attempt < 2; attempt++) {
        /* LOCK_REPAIR needs no unwinding here: a claim publishes `state` last, and the
         * liveness mutex of a half-claimed slot comes back EOWNERDEAD to the next
         * claimant.  The flag it set makes the next operation repair the rest. */
        int r = lock_acquire(c, &c->hdr->slot_lock, "slot table");
        if (r < 0) return r;
        r = claim_locked(c, start);
        lock_release(&c->hdr->slot_lock);
        if (r == 0) return 0;
        if (attempt == 0 && seg_repair(c, 1) < 0) break;
    }
    return seg_err(SHM_ENOSLOT, "all %u process slots are held by live processes "
                   "(raise max_slots)", c->max_slots);
}

static void counters_add(shm_counters *dst, const shm_counters *src) {
    const uint64_t *s = (const uint64_t *)src;
    uint64_t *d = (uint64_t *)dst;
    for (size_t i = 0; i < sizeof *src / 8; i++) ADD_RLX(&d[i], LOAD_RLX(&s[i]));
}

/* Free a slot (slot table lock held).  Its pins must already be gone. */
static void slot_free_locked(shm_cache *c, slot *s) {
    counters_add(&c->hdr->retired, &s->ctr);
    memset(&s->ctr, 0, sizeof s->ctr);
    memset(s->pins, 0, sizeof s->pins);
    s->pid = 0;
    s->starttime = 0;
    STORE(&s->state, 0u);
    (void)c;
}

void slot_release(shm_cache *c) {
    if (c->slot_id < 0) return;
    slot *s = &c->slots[c->slot_id];
    for (uint32_t i = 0; i < PINS_PER_SLOT; i++)
        if (LOAD_RLX(&s->pins[i])) shm_unpin(c, ((uint32_t)(c->slot_id + 1) << 8) | i);
    /* LOCK_REPAIR needs no unwinding: only this process's own slot is written, and the
     * flag the lock set makes the next operation repair the rest. */
    if (lock_acquire(c, &c->hdr->slot_lock, "slot table") >= 0) {
        slot_free_locked(c, s);
        lock_release(&c->hdr->slot_lock);
    }
    /* Fails harmlessly (EPERM) if another thread attached: that thread's exit then
     * leaves the mutex owner-dead, which the next claimant handles. */
    if (!lock_damaged(&s->live)) pthread_mutex_unlock(&s->live.m);
    c->slot_id = -1;
    c->ctr = &c->sink;
}

int shm_my_slot(shm_cache *c) { return c->slot_id; }

/* ---- fork ---- */

static pthread_mutex_t handles_mu = PTHREAD_MUTEX_INITIALIZER;
static shm_cache *handles;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void atfork_prepare(void) { pthread_mutex_lock(&handles_mu); }
static void atfork_parent(void) { pthread_mutex_unlock(&handles_mu); }
static void atfork_child(void) {
    for (shm_cache *c = handles; c; c = c->next_handle) {
        c->slot_id = -1;
        c->ctr = &c->sink;
        c->pid = getpid();
        slot_claim(c);   /* without a slot the child still works, uncounted */
    }
    pthread_mutex_unlock(&handles_mu);
}
static void atfork_install(void) {
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

void slot_register_handle(shm_cache *c) {
    pthread_once(&atfork_once, atfork_install);
    pthread_mutex_lock(&handles_mu);
    c->next_handle = handles;
    handles = c;
    pthread_mutex_unlock(&handles_mu);
}

void slot_unregister_handle(shm_cache *c) {
    pthread_mutex_lock(&handles_mu);
    for (shm_cache **p = &handles; *p; p = &(*p)->next_handle)
        if (*p == c) {
            *p = c->next_handle;
            break;
        }
    pthread_mutex_unlock(&handles_mu);
}

/* ---- repair ---- */

static void release_all(held *h) {
    while (h->n) lock_release(h->locks[--h->n]);
}

static int take(shm_cache *c, held *h, shm_lock *l, const char *what) {
    int r = lock_acquire(c, l, what);
    if (r < 0) return r;
    h->locks[h->n++] = l;
    return 0;
}

/* Every lock after the slot table, in the global order. */
int seg_lock_rest(shm_cache *c, held *h) {
    int rc = 0;
    for (uint32_t i = 0; rc == 0 && i < c->nstripes; i++)
        rc = take(c, h, &c->stripes[i], "index stripe");
    for (uint32_t i = 0; rc == 0 && i <= c->nslab; i++)
        rc = take(c, h, &c->classes[i].lock, "size class");
    if (rc == 0) rc = take(c, h, &c->pool->lock, "page pool");
    if (rc == 0) rc = take(c, h, &c->jr->lock, "journal");
    return rc;
}

void seg_unlock_all(held *h) { release_all(h); }

shm_lock **seg_lock_array(shm_cache *c) {
    return malloc(sizeof(shm_lock *) * (c->nstripes + c->nslab + 8));
}

static int item_in_chunk(shm_cache *c, item *it, uint64_t chunk) {
    return item_sane(c, it) && item_total(it) <= chunk && it->klen >= 1 &&
           it->klen <= c->max_key_len;
}

/* Marks every item reachable from the index; cuts chains at the first bad link. */
static void mark_index(shm_cache *c) {
    for (uint64_t b = 0; b < c->nbuckets; b++) {
        ref_t *link = &c->buckets[b];
        for (uint32_t steps = 0; steps < MAX_CHAIN_STEPS; steps++) {
            ref_t r = *link;
            if (!r) break;
            item *it = ref_item(c, r);
            uint64_t chunk = it ? slab_chunk_bytes(c, it) : 0;
            int ok = it && chunk && (it->state & IT_STATE_MASK) == IT_LINKED &&
                     !(it->state & IT_MARK) && item_in_chunk(c, it, chunk);
            if (ok) {
                uint64_t pidx = page_index(c, it);
                uint8_t pc = c->pages[pidx].cls;
                uint64_t rel = (uint64_t)((uint8_t *)it - page_addr(c, pidx));
                ok = (pc < c->nslab ? rel % c->class_size[pc] == 0 : rel == 0) &&
                     (idx_hash(item_key(it), it->klen) & c->bucket_mask) == b &&
                     hash_item_csum(it) == it->csum;
            }
            if (!ok) {
                STORE(link, (ref_t)0);   /* cut: the rest is unreachable, freed below */
                break;
            }
            it->state |= IT_MARK;
            link = &it->hnext;
        }
        if (*link) STORE(link, (ref_t)0);   /* longer than MAX_CHAIN_STEPS: a cycle */
    }
}

/* Validates the page map in place: bad entries become free pages. */
static void fix_page_map(shm_cache *c) {
    for (uint64_t i = 0; i < c->npages;) {
        page *p = &c->pages[i];
        if (p->cls < c->nslab) {
            i++;
            continue;
        }
        if (p->cls == c->nslab) {
            uint64_t run = p->run, j = 1;
            if (run >= 1 && run <= c->npages - i)
                for (; j < run && c->pages[i + j].cls == PG_LARGE_CONT; j++) {}
            if (run >= 1 && run <= c->npages - i && j == run) {
                i += run;
                continue;
            }
        }
        p->cls = PG_FREE;   /* free page, or stray continuation, or garbage */
        p->run = 0;
        i++;
    }
}

typedef void (*chunk_fn)(shm_cache *c, uint64_t pidx, uint32_t cls, item *it, void *arg);

static void for_each_chunk(shm_cache *c, chunk_fn fn, void *arg) {
    for (uint64_t i = 0; i < c->npages;) {
        page *p = &c->pages[i];
        if (p->cls < c->nslab) {
            uint32_t sz = c->class_size[p->cls], per = c->page_bytes / sz;
            for (uint32_t j = 0; j < per; j++)
                fn(c, i, p->cls, (item *)(page_addr(c, i) + (uint64_t)j * sz), arg);
            i++;
        } else if (p->cls == c->nslab && p->run >= 1 && p->run <= c->npages - i) {
            uint64_t run = p->run;   /* fn may free the run */
            fn(c, i, c->nslab, (item *)page_addr(c, i), arg);
            i += run;
        } else {
            i++;
        }
    }
}

static void zero_pins(shm_cache *c, uint64_t pidx, uint32_t cls, item *it, void *arg) {
    (void)c; (void)pidx; (void)cls; (void)arg;
    it->pins = 0;
}

static void clear_scratch(shm_cache *c, uint64_t pidx, uint32_t cls, item *it, void *arg) {
    (void)c; (void)pidx; (void)cls; (void)arg;
    it->state &= (uint8_t)~IT_SCRATCH;
}

/* Scratch bits left by a repair or verify that was killed halfway (all locks held). */
void seg_clear_scratch(shm_cache *c) { for_each_chunk(c, clear_scratch, NULL); }

typedef struct rebuild_ctx {
    const uint8_t *dead;       /* per slot: 1 if being reaped */
} rebuild_ctx;

static int slot_live_owner(shm_cache *c, const rebuild_ctx *x, uint16_t owner) {
    return owner < c->max_slots && c->slots[owner].state == 1 && !x->dead[owner];
}

static void classify(shm_cache *c, uint64_t pidx, uint32_t cls, item *it, void *arg) {
    const rebuild_ctx *x = arg;
    sclass *k = &c->classes[cls];
    page *p = &c->pages[pidx];
    uint64_t chunk = cls < c->nslab ? c->class_size[cls] : (uint64_t)p->run << c->page_shift;
    uint8_t st = it->state & IT_STATE_MASK;
    int keep = 0;
    if (it->state & IT_MARK) {
        it->state = (uint8_t)((it->state & IT_QUEUE1) | IT_LINKED);
        it->cls = (uint8_t)cls;
        ev_relink(c, k, it);
        k->entries++;
        k->payload_bytes += item_total(it);
        keep = 1;
    } else if (st == IT_RESERVED && slot_live_owner(c, x, it->owner)) {
        keep = 1;
    } else if (st == IT_ZOMBIE && it->pins) {
        keep = 1;
    }
    it->cls = (uint8_t)cls;
    if (cls == c->nslab) {
        if (keep) {
            k->pages += p->run;
            k->used_bytes += chunk;
        } else {
            uint64_t run = p->run;
            it->state = IT_FREE;
            for (uint64_t j = 0; j < run; j++) {
                c->pages[pidx + j].cls = PG_FREE;
                c->pages[pidx + j].run = 0;
            }
        }
        return;
    }
    if (keep) {
        k->used_bytes += chunk;
        return;
    }
    it->state = IT_FREE;
    it->pins = 0;
    it->next = p->freelist;
    p->freelist = item_ref(c, it);
    p->nfree++;
}

static void rebuild(shm_cache *c, const rebuild_ctx *x) {
    for (uint32_t i = 0; i <= c->nslab; i++) {
        sclass *k = &c->classes[i];
        k->pages = 0;
        k->entries = k->used_bytes = k->payload_bytes = k->free_chunks = 0;
        k->partial = 0;
        memset(k->q, 0, sizeof k->q);
        k->hand = 0;
        k->chunk = i < c->nslab ? c->class_size[i] : 0;
        k->per_page = i < c->nslab ? c->page_bytes / k->chunk : 0;
    }
    fix_page_map(c);
    for (uint64_t i = 0; i < c->npages; i++)
        if (c->pages[i].cls < c->nslab) {
            c->pages[i].freelist = 0;
            c->pages[i].nfree = 0;
            c->pages[i].next = c->pages[i].prev = 0;
        }
    seg_clear_scratch(c);   /* an interrupted repair is simply redone from the start */
    mark_index(c);
    for_each_chunk(c, zero_pins, NULL);
    /* Pins come back from the live slots' tables, the authoritative record. */
    for (uint32_t s = 0; s < c->max_slots; s++) {
        slot *sl = &c->slots[s];
        for (uint32_t i = 0; i < PINS_PER_SLOT; i++) {
            ref_t r = sl->pins[i];
            if (!r) continue;
            item *it = ref_item(c, r);
            uint8_t st = it ? it->state & IT_STATE_MASK : 0;
            uint64_t chunk = it ? slab_chunk_bytes(c, it) : 0;
            if (sl->state != 1 || x->dead[s] || !it || !chunk ||
                !((it->state & IT_MARK) || st == IT_ZOMBIE || st == IT_LINKED) ||
                it->pins == 0xffff) {
                sl->pins[i] = 0;
                continue;
            }
            /* Pinned but no longer indexed (its remover died halfway): a live reader
             * still holds a view of it, so it lives on as a zombie until unpinned. */
            if (!(it->state & IT_MARK) && st == IT_LINKED)
                it->state = (uint8_t)((it->state & ~IT_STATE_MASK) | IT_ZOMBIE);
            it->pins++;
        }
    }
    for_each_chunk(c, classify, (void *)x);
    uint64_t free_pages = 0, entries = 0;
    for (uint64_t i = 0; i < c->npages; i++) {
        page *p = &c->pages[i];
        if (p->cls < c->nslab) {
            sclass *k = &c->classes[p->cls];
            if (p->nfree == k->per_page) {
                p->cls = PG_FREE;
                p->freelist = 0;
                p->nfree = 0;
            } else {
                k->pages++;
                k->free_chunks += p->nfree;
                if (p->nfree) {
                    p->next = k->partial;
                    p->prev = 0;
                    if (k->partial) c->pages[k->partial - 1].prev = (uint32_t)i + 1;
                    k->partial = (uint32_t)i + 1;
                }
            }
        }
        if (p->cls == PG_FREE) free_pages++;
    }
    for (uint32_t i = 0; i <= c->nslab; i++) entries += c->classes[i].entries;
    c->pool->free_pages = free_pages;
    c->pool->hint = 0;
    STORE(&c->hdr->entries, entries);
}

int seg_repair(shm_cache *c, int only_if_needed) {
    uint8_t *dead = calloc(c->max_slots, 1);
    shm_lock **locks = seg_lock_array(c);
    if (!dead || !locks) {
        free(dead);
        free(locks);
        return seg_err(SHM_ENOMEM, "out of memory for repair");
    }
    uint32_t ndead = 0;
    for (uint32_t i = 0; i < c->max_slots; i++) {
        slot *s = &c->slots[i];
        if ((int)i == c->slot_id || LOAD(&s->state) != 1) continue;
        if (proc_dead(s->pid, s->starttime)) dead[i] = 1, ndead++;
    }
    int rc = 0, reaped = 0;
    held h = {locks, 0};
    if (only_if_needed && !ndead && !LOAD(&c->hdr->needs_repair)) goto out;
    if ((rc = take(c, &h, &c->hdr->slot_lock, "slot table")) < 0) goto out;
    for (uint32_t i = 0; i < c->max_slots; i++) {
        if (!dead[i]) continue;
        slot *s = &c->slots[i];
        if (s->state == 1 && lock_damaged(&s->live)) lock_init(&s->live, i);  /* dead */
        int t = s->state == 1 ? pthread_mutex_trylock(&s->live.m) : EBUSY;
        if (t == EOWNERDEAD) pthread_mutex_consistent(&s->live.m);
        else if (t != 0) {
            dead[i] = 0;       /* its holder thread lives: not dead after all */
            ndead--;
            continue;
        }
        /* Dead for sure.  Let go of its liveness mutex now (the slot table lock keeps
         * the slot from being claimed until it is freed below): a repair must hold as
         * few robust locks as possible, since a dying thread's list is walked only for
         * 2048 of them. */
        pthread_mutex_unlock(&s->live.m);
    }
    if (!ndead && !LOAD(&c->hdr->needs_repair) && only_if_needed) goto unlock_slots;
    rc = seg_lock_rest(c, &h);
    if (rc == 0) {
        rebuild_ctx x = {dead};
        rebuild(c, &x);
        jr_check(c, NULL, NULL);
        STORE(&c->hdr->needs_repair, 0u);
        c->hdr->repairs++;
    }
unlock_slots:
    for (uint32_t i = 0; i < c->max_slots; i++) {
        if (!dead[i]) continue;
        if (rc == 0) {
            slot_free_locked(c, &c->slots[i]);
            reaped++;
        }
    }
    release_all(&h);
out:
    free(dead);
    free(locks);
    return rc < 0 ? rc : reaped;
}

int shm_reap(shm_cache *c) { return seg_repair(c, 1); }
