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
#include <oneapi/dnnl/dnnl_debug.h>
