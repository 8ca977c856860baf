/* hash.c - the keyed 64-bit hash of key bytes (wyhash construction, fixed key).
 *
 * Stable across processes, restarts and machines of the same endianness, unlike
 * Python's hash().  Also used, with another seed, for entry checksums.
 */
#include "internal.h"

static const uint64_t wyp[4] = {0x2d358dccaa6c78a5ULL, 0x8bb84b93962eacc9ULL,
                                0x4b33a62ed433d4a3ULL, 0x4d5a2da51de1aa47ULL};
#define HASH_SEED 0x73686d6361636865ULL

static inline void mum128(uint64_t *a, uint64_t *b) {
    __uint128_t r = (__uint128_t)*a * *b;
    *a = (uint64_t)r;
    *b = (uint64_t)(r >> 64);
}
static inline uint64_t mix(uint64_t a, uint64_t b) {
    mum128(&a, &b);
    return a ^ b;
}
static inline uint64_t r8(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint64_t r4(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t r3(const uint8_t *p, uint64_t k) {
    return ((uint64_t)p[0] << 16) | ((uint64_t)p[k >> 1] << 8) | p[k - 1];
}

uint64_t hash_bytes(const void *key, uint64_t len, uint64_t seed) {
    const uint8_t *p = (const uint8_t *)key;
    uint64_t a, b;
    seed ^= mix(seed ^ wyp[0], wyp[1]);
    if (LIKELY(len <= 16)) {
        if (LIKELY(len >= 4)) {
            a = (r4(p) << 32) | r4(p + ((len >> 3) << 2));
            b = (r4(p + len - 4) << 32) | r4(p + len - 4 - ((len >> 3) << 2));
        } else if (len > 0) {
            a = r3(p, len);
            b = 0;
        } else {
            a = b = 0;
        }
    } else {
        uint64_t i = len;
        if (UNLIKELY(i > 48)) {
            uint64_t s1 = seed, s2 = seed;
            do {
                seed = mix(r8(p) ^ wyp[1], r8(p + 8) ^ seed);
                s1 = mix(r8(p + 16) ^ wyp[2], r8(p + 24) ^ s1);
                s2 = mix(r8(p + 32) ^ wyp[3], r8(p + 40) ^ s2);
                p += 48;
                i -= 48;
            } while (LIKELY(i > 48));
            seed ^= s1 ^ s2;
        }
        while (UNLIKELY(i > 16)) {
            seed = mix(r8(p) ^ wyp[1], r8(p + 8) ^ seed);
            i -= 16;
            p += 16;
        }
        a = r8(p + i - 16);
        b = r8(p + i - 8);
    }
    a ^= wyp[1];
    b ^= seed;
    mum128(&a, &b);
    return mix(a ^ wyp[0] ^ len, b ^ wyp[1]);
}

uint64_t shm_hash(const void *key, uint64_t len) {
    return hash_bytes(key, len, HASH_SEED);
}

uint64_t idx_hash(const char *key, uint32_t klen) {
    return hash_bytes(key, klen, HASH_SEED);
}

/* Covers the lengths and the bytes, so a torn or scribbled entry is detected.  (Plain
 * wyhash: measured faster than add/xor lane checksums here, ~190 ns for 4 KiB.) */
uint32_t hash_item_csum(const item *it) {
    uint64_t h = hash_bytes(it + 1, (uint64_t)it->klen + it->vlen,
                            0x636b73756dULL ^ ((uint64_t)it->klen << 32) ^ it->vlen);
    return (uint32_t)(h ^ (h >> 32));
}
