#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <oneapi/dnnl/dnnl.h>

// Macros Swift cannot import as constants.
static inline void *cdnnl_memory_allocate(void) { return DNNL_MEMORY_ALLOCATE; }
static inline int cdnnl_arg_src(void) { return DNNL_ARG_SRC; }
static inline int cdnnl_arg_dst(void) { return DNNL_ARG_DST; }
static inline int cdnnl_arg_weights(void) { return DNNL_ARG_WEIGHTS; }
static inline int cdnnl_arg_bias(void) { return DNNL_ARG_BIAS; }
static inline int cdnnl_arg_diff_src(void) { return DNNL_ARG_DIFF_SRC; }
static inline int cdnnl_arg_diff_dst(void) { return DNNL_ARG_DIFF_DST; }
static inline int cdnnl_arg_diff_weights(void) { return DNNL_ARG_DIFF_WEIGHTS; }
static inline int cdnnl_arg_diff_bias(void) { return DNNL_ARG_DIFF_BIAS; }
static inline int cdnnl_arg_from(void) { return DNNL_ARG_FROM; }
static inline int cdnnl_arg_scratchpad(void) { return DNNL_ARG_SCRATCHPAD; }
static inline int cdnnl_arg_to(void) { return DNNL_ARG_TO; }
static inline int cdnnl_arg_attr_scales(void) { return DNNL_ARG_ATTR_SCALES; }
#include <oneapi/dnnl/dnnl_debug.h>

// The file of the oneDNN library this process loaded (NULL where unknown).
static inline const char *cdnnl_library_path(void) {
    Dl_info info;
    return dladdr((void *)dnnl_version, &info) && info.dli_fname ? info.dli_fname : 0;
}

// libgomp, the OpenMP runtime oneDNN's GNU OpenMP build runs on: the entry point GCC compiles `#pragma omp parallel`
// to, so that our own parallel loops run on oneDNN's thread team instead of a second pool of threads
// (one team of N threads for every kernel: no spinning OpenMP workers beside Dispatch's).
extern void GOMP_parallel(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags);
extern int omp_get_thread_num(void);
extern int omp_get_num_threads(void);
