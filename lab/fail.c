/*
 * fail.c -- the lab's own error sentences, beside the library's: a status
 * and a sentence naming what was wrong (a file, a tensor, a size), kept
 * per thread until the next failure.  The lab's callers print
 * lab_last_error() as the library's print mha_last_error().
 */
#include "lab.h"

#include <stdarg.h>
#include <stdio.h>

static _Thread_local char message[512];

mha_status lab_fail(mha_status status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    return status;
}

mha_status lab_fail_mha(mha_status status, const char *what)
{
    return lab_fail(status, "%s: %s", what, mha_last_error());
}

const char *lab_last_error(void) { return message[0] ? message : "no error"; }
