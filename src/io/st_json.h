/*
 * st_json.h -- bounded parser for the JSON header of a safetensors file.
 * It checks syntax and the schema's shape; safetensors.c checks values.
 */
#ifndef MHA_ST_JSON_H
#define MHA_ST_JSON_H

#include "core/internal.h"

typedef struct mha__json_tensor {
    char *name;    /* owned by the receiver */
    char dtype[8]; /* as written; "?" if too long */
    int rank;
    int64_t shape[MHA_ST_MAX_RANK];
    int64_t offsets[2]; /* begin, end within the data */
} mha__json_tensor;

typedef struct mha__json_callbacks {
    void *user;
    /* Takes ownership of t->name, also on failure. */
    mha_status (*tensor)(void *user, mha__json_tensor *t);
    /* key and value stay owned by the parser. */
    mha_status (*metadata)(void *user, const char *key, const char *value);
} mha__json_callbacks;

/* Parse text[0..len); CORRUPT with the byte offset on any fault. */
mha_status mha__json_parse_header(const char *text, size_t len, mha__json_callbacks *cb);

#endif /* MHA_ST_JSON_H */
