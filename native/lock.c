/* lock.c - robust, process-shared mutexes with bounded waits.
 *
 * Every segment lock is PTHREAD_MUTEX_ROBUST + PTHREAD_PROCESS_SHARED.  When a holder
 * dies, the next acquirer gets EOWNERDEAD: we mark the mutex consistent at once (an
 * owner-dead mutex unlocked without that becomes unusable forever), flag the segment
 * for repair and report LOCK_REPAIR so the caller unwinds and repairs before touching
 * what the dead holder may have left half-changed.  Waits are bounded by
 * lock_timeout_ms and fail with a message that names the lock and its last holder.
 */
#include <time.h>
#include <unistd.h>

#include "internal.h"

static int mutex_init(pthread_mutex_t *m) {
    pthread_mutexattr_t a;
    int rc = pthread_mutexattr_init(&a);
    if (rc == 0) rc = pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
    if (rc == 0) rc = pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    if (rc == 0) rc = pthread_mutex_init(m, &a);
    pthread_mutexattr_destroy(&a);
    return rc;
}

int lock_init(shm_lock *l, uint32_t id) {
    int rc = mutex_init(&l->m);
    l->holder_pid = 0;
    l->id = id;
    return rc == 0 ? 0 : seg_err(SHM_ESYS, "pthread_mutex_init: %s", strerror(rc));
}

/* A mutex lives in memory any process of this user can scribble on.  glibc trusts the
 * mutex's kind field and asserts (aborting the interpreter) on some garbage values, so
 * before every use we compare it with the kind our own initialisation produces. */
#ifdef __GLIBC__
static int expected_kind;   /* nonzero once probed: robust+pshared set bits */
static pthread_once_t kind_once = PTHREAD_ONCE_INIT;
static void kind_probe(void) {
    pthread_mutex_t m;
    if (mutex_init(&m) == 0) {
        expected_kind = m.__data.__kind;
        pthread_mutex_destroy(&m);
    }
}
int lock_damaged(shm_lock *l) {
    if (UNLIKELY(!expected_kind)) pthread_once(&kind_once, kind_probe);
    return LOAD_RLX(&l->m.__data.__kind) != expected_kind;
}
#else
int lock_damaged(shm_lock *l) { (void)l; return 0; }
#endif

static int lock_took(shm_cache *c, shm_lock *l, int rc) {
    if (rc == 0) {
        STORE_RLX(&l->holder_pid, c->pid);
        return 0;
    }
    if (rc == EOWNERDEAD) {
        pthread_mutex_consistent(&l->m);
        STORE_RLX(&l->holder_pid, c->pid);
        STORE(&c->hdr->needs_repair, 1u);
        ADD_RLX(&c->ctr->lock_repairs, 1);
        return LOCK_REPAIR;
    }
    return -1;
}

int lock_acquire(shm_cache *c, shm_lock *l, const char *what) {
    if (UNLIKELY(lock_damaged(l)))
        return seg_err(SHM_ECORRUPT, "%s lock %u is damaged (overwritten in shared memory); "
                       "the segment must be recreated", what, l->id);
    int rc = pthread_mutex_trylock(&l->m);
    if (LIKELY(rc == 0)) {
        STORE_RLX(&l->holder_pid, c->pid);
        return 0;
    }
    if (rc == EBUSY) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += c->lock_timeout_ms / 1000;
        ts.tv_nsec += (long)(c->lock_timeout_ms % 1000) * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        rc = pthread_mutex_timedlock(&l->m, &ts);
    }
    int r = lock_took(c, l, rc);
    if (r >= 0) return r;
    if (rc == ETIMEDOUT)
        return seg_err(SHM_ETIMEDOUT,
                       "timed out after %u ms waiting for %s lock %u (last holder pid %d)",
                       c->lock_timeout_ms, what, l->id, (int)LOAD_RLX(&l->holder_pid));
    if (rc == ENOTRECOVERABLE)
        return seg_err(SHM_ECORRUPT, "%s lock %u is not recoverable", what, l->id);
    return seg_err(SHM_ESYS, "locking %s lock %u: %s", what, l->id, strerror(rc));
}

int lock_try(shm_cache *c, shm_lock *l) {
    if (UNLIKELY(lock_damaged(l))) return -1;
    int rc = pthread_mutex_trylock(&l->m);
    int r = lock_took(c, l, rc);
    if (r == 0) return 0;
    if (r == LOCK_REPAIR) {
        /* We own it and it is consistent again; the caller treats this as "busy"
         * and the segment-wide repair flag makes the next operation repair. */
        pthread_mutex_unlock(&l->m);
    }
    return -1;
}

void lock_release(shm_lock *l) {
    pthread_mutex_unlock(&l->m);
}
