/* journal.c - the write journal: a bounded ring of (op, key, version) records.
 *
 * Writers append after their operation has been published; the sidecar drains in
 * batches and writes behind to Redis/disk, fetching the value itself and comparing
 * versions, so a late write-back can never resurrect a value that was deleted or
 * replaced.  A full ring drops its oldest records and counts them: a worker never waits
 * for the sidecar.  Positions are 64-bit byte counters (head - tail <= cap); a record
 * never wraps: if it does not fit before the end, the tail end is skipped.
 */
#include <stdio.h>
#include <time.h>

#include "internal.h"

#define REC_ALIGN 8u

static uint64_t rec_bytes(uint32_t klen) {
    return (sizeof(shm_journal_record) + klen + REC_ALIGN - 1) & ~(uint64_t)(REC_ALIGN - 1);
}

void jr_init(shm_cache *c) {
    journal *j = c->jr;
    j->head = j->tail = 0;
    j->cap = c->jcap;
    j->records = j->dropped = 0;
}

/* The record at position pos, or NULL if what is there is not a sane record. */
static shm_journal_record *rec_at(shm_cache *c, uint64_t *pos) {
    uint64_t off = *pos % c->jcap;
    if (c->jcap - off < sizeof(shm_journal_record)) {
        *pos += c->jcap - off;   /* skipped tail end */
        off = 0;
    }
    shm_journal_record *r = (shm_journal_record *)(c->jdata + off);
    if (r->op == 0) {            /* explicit skip marker: rest of the ring */
        *pos += c->jcap - off;
        off = 0;
        r = (shm_journal_record *)c->jdata;
    }
    if (r->op < SHM_JOP_SET || r->op > SHM_JOP_CLEAR || r->key_len > 65535 ||
        off + rec_bytes(r->key_len) > c->jcap)
        return NULL;
    return r;
}

static void drop_oldest(shm_cache *c, journal *j) {
    uint64_t pos = j->tail;
    shm_journal_record *r = rec_at(c, &pos);
    if (!r) {                    /* damaged: forget everything */
        ADD_RLX(&j->dropped, j->records);
        j->records = 0;
        j->tail = j->head;
        return;
    }
    j->tail = pos + rec_bytes(r->key_len);
    j->records--;
    ADD_RLX(&j->dropped, 1);
}

void jr_append(shm_cache *c, uint32_t op, const char *key, uint32_t klen, uint64_t version,
               int64_t expire_ms) {
    journal *j = c->jr;
    uint64_t need = rec_bytes(klen);
    if (need > c->jcap / 2) {
        ADD_RLX(&j->dropped, 1);
        return;
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    int64_t now_us = (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
    int r = lock_acquire(c, &j->lock, "journal");
    if (r < 0) {                 /* cannot log: the record is lost, and counted */
        ADD_RLX(&j->dropped, 1);
        return;
    }
    if (r == LOCK_REPAIR) jr_check(c, NULL, NULL);
    uint64_t off = j->head % c->jcap, skip = c->jcap - off < need ? c->jcap - off : 0;
    while (j->records && j->head + skip + need - j->tail > c->jcap) drop_oldest(c, j);
    if (!j->records) j->tail = j->head;
    if (skip >= sizeof(shm_journal_record))   /* after the drops: that space is free now */
        ((shm_journal_record *)(c->jdata + off))->op = 0;
    j->head += skip;
    shm_journal_record *rec = (shm_journal_record *)(c->jdata + j->head % c->jcap);
    rec->version = version;
    rec->expires_at_ms = expire_ms;
    rec->at_us = now_us;
    rec->op = op;
    rec->key_len = klen;
    memcpy(rec + 1, key, klen);
    j->head += need;
    j->records++;
    lock_release(&j->lock);
}

int64_t shm_journal_drain(shm_cache *c, char *buf, uint64_t cap) {
    if (!c->jcap) return 0;
    journal *j = c->jr;
    int r = lock_acquire(c, &j->lock, "journal");
    if (r < 0) return r;
    if (r == LOCK_REPAIR) jr_check(c, NULL, NULL);
    uint64_t used = 0;
    while (j->records) {
        uint64_t pos = j->tail;
        shm_journal_record *rec = rec_at(c, &pos);
        if (!rec) {
            jr_check(c, NULL, NULL);
            break;
        }
        uint64_t n = rec_bytes(rec->key_len);
        if (used + n > cap) break;
        memcpy(buf + used, rec, n);
        used += n;
        j->tail = pos + n;
        j->records--;
    }
    lock_release(&j->lock);
    return (int64_t)used;
}

/* Check the ring (journal lock held, or from verify with report).  A damaged ring is
 * reset when report is NULL; otherwise the problem is described.  Returns problems. */
int jr_check(shm_cache *c, char **report, uint64_t *cap) {
    if (!c->jcap) return 0;
    journal *j = c->jr;
    int bad = j->cap != c->jcap || j->tail > j->head || j->head - j->tail > c->jcap;
    uint64_t pos = j->tail, n = 0;
    for (; !bad && n < j->records; n++) {
        shm_journal_record *r = rec_at(c, &pos);
        if (!r) bad = 1;
        else pos += rec_bytes(r->key_len);
        if (pos > j->head) bad = 1;
    }
    if (!bad && pos != j->head) bad = 1;
    if (!bad) return 0;
    if (!report) {
        j->cap = c->jcap;
        ADD_RLX(&j->dropped, j->records);
        j->records = 0;
        j->tail = j->head = 0;
        return 1;
    }
    if (*cap > 1) {
        int w = snprintf(*report, *cap, "journal: ring positions or records are damaged\n");
        if (w > 0 && (uint64_t)w < *cap) *report += w, *cap -= (uint64_t)w;
    }
    return 1;
}
