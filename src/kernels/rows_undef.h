/*
 * rows_undef.h -- the end of a decoding row template (rows_avx2.h,
 * rows_avx512.h, rows_generic.h), in one place: undefines what the
 * including kernel file defined for the instance (the element, its load
 * or widening, the functions' names, the options) and what
 * rows_options.h made of the options, so that the next instance starts
 * afresh.  Each template undefines its own helpers before including it.
 */
#undef ROWS_ELEM
#undef ROWS_LOAD
#undef ROWS_WIDEN
#undef ROWS_DOT
#undef ROWS_AXPY
#undef ROWS_DOT_MULTI
#undef ROWS_AXPY_MULTI
#undef ROWS_SCALED
#undef ROWS_KEYWISE
#undef ROWS_KEY_BLOCKS
#undef ROWS_PREFETCHED
#undef ROWS_PREFETCH
#undef ROWS_L1_KEYS
#undef ROWS_L2_KEYS
#undef ROWS_SCALE_PARAM
#undef ROWS_SCALE_ARG
#undef ROWS_SCALE4
#undef ROWS_SCALE1
#undef ROWS_WEIGHT
