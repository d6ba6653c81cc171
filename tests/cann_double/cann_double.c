/* A CPU double of CANN's aclnn C ABI for grouped matmul: the subset gmm-plugin's binding
 * (gmm_plugin/csrc/aclnn_gmm.cpp) resolves, with the real names and signatures of
 * /work/shared/reference/aclnn-abi.md (hicann/opbase acl_meta.h, hicann/ops-transformer
 * grouped_matmul op_api headers). It computes on host memory (CPU tensors stand in for device
 * ones) and enforces the host-side rules of that reference, §1-2: argument order and count, enums,
 * base pointer + element offset inside the storage dims, format by rank, stride-based transposition,
 * lists owning their tensors, the single-use executor, the workspace rule, group_list limits and the
 * 161001/161002 status codes, each error with its text for aclGetRecentErrMsg.
 *
 * What it models beyond the sources is marked "double:" in its messages: it takes no bias,
 * quantisation or activation arguments, a single x/weight/y tensor (splitItem 2/3), and it reads the
 * group_list values in the run (on hardware they live on the device) and refuses values whose device
 * behaviour is undocumented instead of guessing it.
 *
 * Build variants drop exports to test the binding's fallbacks: -DCANN_DOUBLE_NO_V5, _NO_V4, _NO_ADD,
 * _NO_ADDV2. cann_double_count() and cann_double_set_workspace() are the double's own (not CANN names):
 * live objects per kind and the count of ownership/lifetime violations, so a test sees a leak or a
 * double free; the workspace phase 1 asks for, so a test can make its allocation fail. It is C and
 * also valid C++: with -x c++ -DCANN_DOUBLE_CANN_HEADERS and a CANN include directory it is compiled
 * against CANN's own declarations (tests/test_aclnn_abi.py::test_declarations_are_cann_headers).
 */
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef CANN_DOUBLE_CANN_HEADERS
/* The check build (docs/npu.md): compiled as C++ against CANN's own headers, where any definition
 * below whose signature differs from CANN's declaration is a "conflicting declaration of C function". */
#include "acl/acl_rt.h"
#include "aclnn/acl_meta.h"
#include "aclnnop/aclnn_grouped_matmul_v4.h"
#include "aclnnop/aclnn_grouped_matmul_v5.h"
#if __has_include("aclnnop/aclnn_grouped_matmul_add.h")
#include "aclnnop/aclnn_grouped_matmul_add.h"
#endif
#if __has_include("aclnnop/aclnn_grouped_matmul_add_v2.h")
#include "aclnnop/aclnn_grouped_matmul_add_v2.h"
#endif
#else
/* hicann/runtime include/external/acl/acl_base_rt.h (the enums, aclrtStream), hicann/opbase acl_meta.h. */
typedef int32_t aclnnStatus;
typedef enum {
    ACL_DT_UNDEFINED = -1, ACL_FLOAT = 0, ACL_FLOAT16 = 1, ACL_INT8 = 2, ACL_INT32 = 3, ACL_UINT8 = 4,
    ACL_INT16 = 6, ACL_UINT16 = 7, ACL_UINT32 = 8, ACL_INT64 = 9, ACL_UINT64 = 10, ACL_DOUBLE = 11,
    ACL_BOOL = 12, ACL_BF16 = 27
} aclDataType;
typedef enum {
    ACL_FORMAT_UNDEFINED = -1, ACL_FORMAT_NCHW = 0, ACL_FORMAT_NHWC = 1, ACL_FORMAT_ND = 2,
    ACL_FORMAT_FRACTAL_NZ = 29, ACL_FORMAT_NCDHW = 30, ACL_FORMAT_NCL = 47
} aclFormat;
typedef void *aclrtStream;
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define OK 0
#define PARAM_NULLPTR 161001
#define PARAM_INVALID 161002
#define INNER 561000

#define MAX_DIMS 8
#define MAX_GROUPS 1024      /* tensor group_list entries */
#define INNER_LIMIT 65536    /* inner axis of x / an untransposed weight must stay below it */
#define WORKSPACE 4096       /* what the double asks for: non-zero, so the workspace rule is exercised */
#define ALIVE 0x41434c31
#define DEAD 0x64656164

typedef struct aclTensor {
    int magic, in_list, ndim;
    int64_t dims[MAX_DIMS], strides[MAX_DIMS], offset, storage_elems;
    aclDataType dtype;
    aclFormat format;
    char *data;
} aclTensor;
typedef struct aclTensorList { int magic; uint64_t size; aclTensor **items; } aclTensorList;
typedef struct aclIntArray { int magic; uint64_t size; int64_t *values; } aclIntArray;
enum { OP_V4 = 1, OP_V5, OP_ADD, OP_ADDV2 };
static const char *OP_NAMES[] = {"", "aclnnGroupedMatmulV4", "aclnnGroupedMatmulV5", "aclnnGroupedMatmulAdd",
                                 "aclnnGroupedMatmulAddV2"};
typedef struct aclOpExecutor {
    int magic, op;
    const aclTensor *x, *w, *gl, *y;   /* read when it runs: they must still be alive then */
    int64_t group_type, group_list_type;
    uint64_t workspace;
    bool empty;
} aclOpExecutor;

static int64_t live_tensors, live_lists, live_arrays, live_executors, violations, runs[OP_ADDV2 + 1];
static char last_error[1024];
static uint64_t workspace_bytes = WORKSPACE;

/* Objects are never freed, only marked DEAD: a stale handle is then reported, not undefined.
 * cann_double_count(kind): live objects of a kind, "violations", or an op's name: its successful runs. */
int64_t cann_double_count(const char *kind) {
    for (int op = OP_V4; op <= OP_ADDV2; op++)
        if (!strcmp(kind, OP_NAMES[op])) return runs[op];
    if (!strcmp(kind, "aclTensor")) return live_tensors;
    if (!strcmp(kind, "aclTensorList")) return live_lists;
    if (!strcmp(kind, "aclIntArray")) return live_arrays;
    if (!strcmp(kind, "aclOpExecutor")) return live_executors;
    if (!strcmp(kind, "violations")) return violations;
    return -1;
}

static aclnnStatus fail(aclnnStatus status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return status;
}

/* The double's own: the workspace phase 1 asks for from now on (a test makes the allocation fail). */
void cann_double_set_workspace(uint64_t bytes) { workspace_bytes = bytes; }

#define VIOLATION(...) (violations++, fail(PARAM_INVALID, __VA_ARGS__))

const char *aclGetRecentErrMsg(void) {
    static char taken[sizeof last_error];  /* the text stays valid until the next call */
    if (!last_error[0]) return NULL;
    memcpy(taken, last_error, sizeof taken);
    last_error[0] = 0;
    return taken;
}

/* ---- objects (acl_meta.h) --------------------------------------------------------------------- */

aclTensor *aclCreateTensor(const int64_t *viewDims, uint64_t viewDimsNum, aclDataType dataType,
                           const int64_t *stride, int64_t offset, aclFormat format,
                           const int64_t *storageDims, uint64_t storageDimsNum, void *tensorData) {
    if ((viewDims == NULL && viewDimsNum > 0) || viewDimsNum > MAX_DIMS || storageDimsNum > MAX_DIMS ||
        (storageDims == NULL && storageDimsNum > 0))
        return NULL;
    aclTensor *t = (aclTensor *)calloc(1, sizeof *t);
    t->magic = ALIVE;
    t->ndim = (int)viewDimsNum;
    t->dtype = dataType;
    t->format = format;
    t->offset = offset;
    t->data = (char *)tensorData;
    int64_t step = 1;
    for (int d = t->ndim - 1; d >= 0; d--) {  /* NULL stride: contiguous */
        t->dims[d] = viewDims[d];
        t->strides[d] = stride ? stride[d] : step;
        step *= viewDims[d];
    }
    t->storage_elems = 1;
    for (uint64_t d = 0; d < storageDimsNum; d++) t->storage_elems *= storageDims[d];
    live_tensors++;
    return t;
}

aclIntArray *aclCreateIntArray(const int64_t *value, uint64_t size) {
    if (value == NULL && size > 0) return NULL;
    aclIntArray *a = (aclIntArray *)calloc(1, sizeof *a);
    a->magic = ALIVE;
    a->size = size;
    a->values = (int64_t *)malloc((size ? size : 1) * sizeof(int64_t));
    if (size) memcpy(a->values, value, size * sizeof(int64_t));
    live_arrays++;
    return a;
}

aclTensorList *aclCreateTensorList(const aclTensor *const *value, uint64_t size) {
    if (value == NULL && size > 0) return NULL;
    for (uint64_t i = 0; i < size; i++)
        if (value[i] == NULL || value[i]->magic != ALIVE || value[i]->in_list) {
            VIOLATION("aclCreateTensorList: item %llu is NULL, destroyed, or already owned by a list",
                      (unsigned long long)i);
            return NULL;
        }
    aclTensorList *l = (aclTensorList *)calloc(1, sizeof *l);
    l->magic = ALIVE;
    l->size = size;
    l->items = (aclTensor **)calloc(size ? size : 1, sizeof(aclTensor *));
    for (uint64_t i = 0; i < size; i++) {
        l->items[i] = (aclTensor *)value[i];
        l->items[i]->in_list = 1;  /* the list owns it now */
    }
    live_lists++;
    return l;
}

static aclnnStatus destroy_tensor(aclTensor *t) {
    t->magic = DEAD;
    live_tensors--;
    return OK;
}

aclnnStatus aclDestroyTensor(const aclTensor *tensor) {
    aclTensor *t = (aclTensor *)tensor;
    if (t == NULL) return OK;
    if (t->magic != ALIVE) return VIOLATION("aclDestroyTensor: the tensor was destroyed already");
    if (t->in_list) return VIOLATION("aclDestroyTensor: the tensor belongs to a list, which destroys it");
    return destroy_tensor(t);
}

aclnnStatus aclDestroyIntArray(const aclIntArray *array) {
    aclIntArray *a = (aclIntArray *)array;
    if (a == NULL) return OK;
    if (a->magic != ALIVE) return VIOLATION("aclDestroyIntArray: the array was destroyed already");
    a->magic = DEAD;
    live_arrays--;
    return OK;
}

aclnnStatus aclDestroyTensorList(const aclTensorList *list) {
    aclTensorList *l = (aclTensorList *)list;
    if (l == NULL) return OK;
    if (l->magic != ALIVE) return VIOLATION("aclDestroyTensorList: the list was destroyed already");
    for (uint64_t i = 0; i < l->size; i++) destroy_tensor(l->items[i]);
    l->magic = DEAD;
    live_lists--;
    return OK;
}

/* acl_meta.h: for an executor made repeatable, or one whose phase 2 never runs (op-plugin destroys the
 * executor of a phase 1 it does not run); a run deletes the executor itself. 561103: NULL (its docs). */
aclnnStatus aclDestroyAclOpExecutor(aclOpExecutor *executor) {
    if (executor == NULL) return fail(561103, "aclDestroyAclOpExecutor: executor is NULL");
    if (executor->magic != ALIVE)
        return VIOLATION("aclDestroyAclOpExecutor: the executor ran or was destroyed already");
    executor->magic = DEAD;
    live_executors--;
    return OK;
}

/* ---- tensor rules ----------------------------------------------------------------------------- */

static int itemsize(aclDataType dt) {
    switch (dt) {
    case ACL_FLOAT: case ACL_INT32: return 4;
    case ACL_FLOAT16: case ACL_BF16: return 2;
    case ACL_INT64: return 8;
    default: return 0;
    }
}

/* A live tensor of `ndim` dims and one of the allowed dtypes, its view inside its storage, in the
 * format op-plugin gives its rank (ND for 2-D, NCL for 3-D). */
static aclnnStatus check_tensor(const char *api, const char *name, const aclTensor *t, int ndim,
                                aclDataType dt1, aclDataType dt2, aclDataType dt3) {
    if (t == NULL) return fail(PARAM_NULLPTR, "%s: %s is NULL", api, name);
    if (t->magic != ALIVE) return VIOLATION("%s: %s was destroyed before its use", api, name);
    if (t->ndim != ndim) return fail(PARAM_INVALID, "%s: %s must be %d-D, got %d-D", api, name, ndim, t->ndim);
    if (t->dtype != dt1 && t->dtype != dt2 && t->dtype != dt3)
        return fail(PARAM_INVALID, "%s: %s has dtype %d, not supported here", api, name, (int)t->dtype);
    aclFormat want = ndim == 3 ? ACL_FORMAT_NCL : ACL_FORMAT_ND;
    if (t->format != want)
        return fail(PARAM_INVALID, "%s: %s has format %d; a %d-D tensor is %d", api, name, (int)t->format, ndim,
                    (int)want);
    if (t->data == NULL) return fail(PARAM_NULLPTR, "%s: %s has no data address", api, name);
    int64_t last = t->offset;
    for (int d = 0; d < ndim; d++) {
        if (t->dims[d] < 0 || t->strides[d] < 0)
            return fail(PARAM_INVALID, "%s: %s has a negative dim or stride", api, name);
        if (t->dims[d] == 0) return OK;
        last += (t->dims[d] - 1) * t->strides[d];
    }
    if (t->offset < 0 || last >= t->storage_elems)
        return fail(PARAM_INVALID, "%s: %s's view (offset %lld, last element %lld) exceeds its storage of %lld "
                    "elements", api, name, (long long)t->offset, (long long)last, (long long)t->storage_elems);
    return OK;
}

static bool contiguous(const aclTensor *t) {
    int64_t step = 1;
    for (int d = t->ndim - 1; d >= 0; d--) {
        if (t->dims[d] != 1 && t->strides[d] != step) return false;
        step *= t->dims[d];
    }
    return true;
}

/* CANN's IsTransposeLastTwoDims: the last two dims swapped by strides, batch strides packed. */
static bool transposed(const aclTensor *t) {
    int n = t->ndim;
    if (n < 2 || t->strides[n - 2] != 1 || t->strides[n - 1] != t->dims[n - 2]) return false;
    int64_t step = t->dims[n - 1] * t->dims[n - 2];
    for (int d = n - 3; d >= 0; d--) {
        if (t->dims[d] != 1 && t->strides[d] != step) return false;
        step *= t->dims[d];
    }
    return true;
}

static aclnnStatus check_group_list(const char *api, const aclTensor *gl, int64_t groups) {
    aclnnStatus s = check_tensor(api, "groupList", gl, 1, ACL_INT64, ACL_INT64, ACL_INT64);
    if (s != OK) return s;
    if (gl->dims[0] < 1 || gl->dims[0] > MAX_GROUPS)
        return fail(PARAM_INVALID, "%s: groupList has %lld entries; 1 to %d are supported", api,
                    (long long)gl->dims[0], MAX_GROUPS);
    if (groups >= 0 && gl->dims[0] != groups)
        return fail(PARAM_INVALID, "%s: groupList has %lld entries for %lld groups", api, (long long)gl->dims[0],
                    (long long)groups);
    return OK;
}

static aclTensor *single(const aclTensorList *l) { return l && l->magic == ALIVE && l->size == 1 ? l->items[0] : NULL; }

static aclnnStatus new_executor(int op, const aclTensor *x, const aclTensor *w, const aclTensor *gl,
                                const aclTensor *y, int64_t group_type, int64_t gl_type, bool empty,
                                uint64_t *workspaceSize, aclOpExecutor **executor) {
    aclOpExecutor *e = (aclOpExecutor *)calloc(1, sizeof *e);
    e->magic = ALIVE;
    e->op = op;
    e->x = x, e->w = w, e->gl = gl, e->y = y;
    e->group_type = group_type, e->group_list_type = gl_type;
    e->workspace = empty ? 0 : workspace_bytes;
    e->empty = empty;
    live_executors++;
    *workspaceSize = e->workspace;
    *executor = e;
    return OK;
}

/* ---- element access and arithmetic (float64 on the host) ------------------------------------------ */

static double load(const aclTensor *t, int64_t i) {
    const char *p = t->data + (t->offset + i) * itemsize(t->dtype);
    switch (t->dtype) {
    case ACL_FLOAT: return *(const float *)p;
    case ACL_FLOAT16: return (double)*(const _Float16 *)p;
    case ACL_BF16: { uint32_t u = (uint32_t)*(const uint16_t *)p << 16; float f; memcpy(&f, &u, 4); return f; }
    case ACL_INT64: return (double)*(const int64_t *)p;
    default: return 0;
    }
}

static void store(const aclTensor *t, int64_t i, double v) {
    char *p = t->data + (t->offset + i) * itemsize(t->dtype);
    switch (t->dtype) {
    case ACL_FLOAT: *(float *)p = (float)v; break;
    case ACL_FLOAT16: *(_Float16 *)p = (_Float16)v; break;
    case ACL_BF16: {  /* round to nearest even */
        float f = (float)v;
        uint32_t u;
        memcpy(&u, &f, 4);
        *(uint16_t *)p = (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
        break;
    }
    default: break;
    }
}

#define AT2(t, i, j) ((i) * (t)->strides[0] + (j) * (t)->strides[1])
#define AT3(t, e, i, j) ((e) * (t)->strides[0] + (i) * (t)->strides[1] + (j) * (t)->strides[2])

/* End offsets of the groups from the group_list values (host memory here, device memory on hardware),
 * or an error for values whose device behaviour the sources leave undocumented. */
static aclnnStatus group_ends(const char *api, const aclTensor *gl, int64_t type, int64_t total, int64_t *ends) {
    int64_t end = 0;
    for (int64_t g = 0; g < gl->dims[0]; g++) {
        int64_t v = (int64_t)load(gl, g * gl->strides[0]);
        int64_t next = type == 0 ? v : end + v;
        if ((type == 1 && v < 0) || next < end || next > total)
            return fail(INNER, "%s: double: groupList entry %lld (%lld) leaves [0, %lld] or goes back; what the "
                        "device does with it is undocumented", api, (long long)g, (long long)v, (long long)total);
        ends[g] = end = next;
    }
    return OK;
}

static aclnnStatus run_gmm(const aclOpExecutor *e) {
    const char *api = OP_NAMES[e->op];
    const aclTensor *x = e->x, *w = e->w, *y = e->y;
    int64_t groups = e->gl->dims[0], ends[MAX_GROUPS];
    int64_t total = e->group_type == 0 ? x->dims[0] : x->dims[1];
    aclnnStatus s = group_ends(api, e->gl, e->group_list_type, total, ends);
    if (s != OK) return s;
    if (e->group_type == 0) {  /* y[rows of g] = x[rows] @ w[g]; rows past the last group: zeros */
        int64_t k = x->dims[1], n = w->dims[2];
        for (int64_t g = 0, row = 0; g < groups; g++)
            for (; row < ends[g]; row++)
                for (int64_t j = 0; j < n; j++) {
                    double acc = 0;
                    for (int64_t c = 0; c < k; c++) acc += load(x, AT2(x, row, c)) * load(w, AT3(w, g, c, j));
                    store(y, AT2(y, row, j), acc);
                }
        for (int64_t row = ends[groups - 1]; row < x->dims[0]; row++)
            for (int64_t j = 0; j < n; j++) store(y, AT2(y, row, j), 0);
    } else {  /* y[g] = x[:, seg g] @ w[seg g]: x [M, K] (transposed view), w [K, N] */
        int64_t m = x->dims[0], n = w->dims[1];
        for (int64_t g = 0, start = 0; g < groups; start = ends[g], g++)
            for (int64_t i = 0; i < m; i++)
                for (int64_t j = 0; j < n; j++) {
                    double acc = 0;
                    for (int64_t c = start; c < ends[g]; c++) acc += load(x, AT2(x, i, c)) * load(w, AT2(w, c, j));
                    store(y, AT3(y, g, i, j), acc);
                }
    }
    return OK;
}

static aclnnStatus run_add(const aclOpExecutor *e) {
    const char *api = OP_NAMES[e->op];
    const aclTensor *x = e->x, *w = e->w, *y = e->y;  /* x [K, M] read transposed, w [K, N], y [G, M, N] */
    int64_t groups = e->gl->dims[0], ends[MAX_GROUPS], m = x->dims[1], n = w->dims[1];
    aclnnStatus s = group_ends(api, e->gl, e->group_list_type, x->dims[0], ends);
    if (s != OK) return s;
    for (int64_t g = 0, start = 0; g < groups; start = ends[g], g++)
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < n; j++) {
                double acc = 0;
                for (int64_t c = start; c < ends[g]; c++) acc += load(x, AT2(x, c, i)) * load(w, AT2(w, c, j));
                int64_t at = (g * m + i) * n + j;  /* yRef is contiguous */
                store(y, at, load(y, at) + acc);
            }
    return OK;
}

/* Phase 2 of every op: the workspace rule, the single-use executor, then the work. */
static aclnnStatus run(int op, void *workspace, uint64_t workspaceSize, aclOpExecutor *executor, aclrtStream stream) {
    (void)stream;  /* host memory: the double runs synchronously on any stream, NULL included */
    const char *api = OP_NAMES[op];
    if (executor == NULL) return fail(PARAM_NULLPTR, "%s: executor is NULL", api);
    if (workspace == NULL && workspaceSize > 0)
        return fail(PARAM_NULLPTR, "%s: workspace is NULL with workspaceSize %llu", api,
                    (unsigned long long)workspaceSize);
    if (executor->magic != ALIVE) return VIOLATION("%s: the executor already ran (it is single use)", api);
    if (executor->op != op)
        return VIOLATION("%s: the executor was made by %sGetWorkspaceSize", api, OP_NAMES[executor->op]);
    if (workspaceSize < executor->workspace)
        return fail(PARAM_INVALID, "%s: workspaceSize %llu is below the %llu bytes asked for", api,
                    (unsigned long long)workspaceSize, (unsigned long long)executor->workspace);
    const aclTensor *ts[] = {executor->x, executor->w, executor->gl, executor->y};
    aclnnStatus s = OK;
    for (int i = 0; i < 4; i++)
        if (ts[i]->magic != ALIVE) s = VIOLATION("%s: a tensor was destroyed before the run read it", api);
    if (s == OK && workspaceSize) memset(workspace, 0xA5, executor->workspace);  /* it is scratch */
    if (s == OK && !executor->empty) s = (op == OP_ADD || op == OP_ADDV2) ? run_add(executor) : run_gmm(executor);
    executor->magic = DEAD;  /* deleted by its run */
    live_executors--;
    if (s == OK) runs[op]++;
    return s;
}

/* ---- aclnnGroupedMatmulV4 / V5 ------------------------------------------------------------------ */

static inline aclnnStatus gmm_prepare(int op, const aclTensorList *x, const aclTensorList *weight,
                               const aclTensorList *const unsupported[10], const aclTensor *groupList,
                               int64_t splitItem, int64_t groupType, int64_t groupListType, int64_t actType,
                               const aclIntArray *tuning, aclTensorList *out, uint64_t *workspaceSize,
                               aclOpExecutor **executor) {
    static const char *unsupported_names[10] = {
        "biasOptional", "scaleOptional", "offsetOptional", "antiquantScaleOptional", "antiquantOffsetOptional",
        "perTokenScaleOptional", "activationInputOptional", "activationQuantScaleOptional",
        "activationQuantOffsetOptional", "activationFeatureOutOptional/dynQuantScaleOutOptional"};
    const char *api = OP_NAMES[op];
    if (x == NULL || weight == NULL || out == NULL) return fail(PARAM_NULLPTR, "%s: x, weight and out are required", api);
    if (workspaceSize == NULL || executor == NULL)
        return fail(PARAM_NULLPTR, "%s: workspaceSize and executor must not be NULL", api);
    for (int i = 0; i < 10; i++)
        if (unsupported[i] != NULL)
            return fail(PARAM_INVALID, "%s: double: %s is not modelled, pass NULL", api, unsupported_names[i]);
    if (tuning != NULL && tuning->magic != ALIVE) return VIOLATION("%s: tuningConfigOptional was destroyed", api);
    if (splitItem != 2 && splitItem != 3)
        return fail(PARAM_INVALID, "%s: splitItem %lld: double: only 2/3 (one output tensor) are modelled", api,
                    (long long)splitItem);
    if (groupType == 1 || groupType < -1 || groupType > 2)
        return fail(PARAM_INVALID, "%s: groupType %lld is not supported (-1, 0 or 2)", api, (long long)groupType);
    if (groupType == -1) return fail(PARAM_INVALID, "%s: double: groupType -1 is not modelled", api);
    if (groupListType == 2) return fail(PARAM_INVALID, "%s: groupListType 2 (sparse) is for int8 only", api);
    if (groupListType != 0 && groupListType != 1)
        return fail(PARAM_INVALID, "%s: groupListType %lld is not 0 (cumsum) or 1 (counts)", api,
                    (long long)groupListType);
    if (actType != 0) return fail(PARAM_INVALID, "%s: double: actType %lld is not modelled", api, (long long)actType);
    aclTensor *xt = single(x), *wt = single(weight), *yt = single(out);
    if (!xt || !wt || !yt)
        return fail(PARAM_INVALID, "%s: double: x, weight and out must be live lists of one tensor", api);
    aclnnStatus s;
    if ((s = check_tensor(api, "x", xt, 2, ACL_FLOAT16, ACL_BF16, ACL_FLOAT)) != OK) return s;
    if ((s = check_tensor(api, "weight", wt, groupType == 0 ? 3 : 2, xt->dtype, xt->dtype, xt->dtype)) != OK) return s;
    if ((s = check_tensor(api, "out", yt, groupType == 0 ? 2 : 3, xt->dtype, xt->dtype, xt->dtype)) != OK) return s;
    if (!contiguous(yt)) return fail(PARAM_INVALID, "%s: out must be contiguous", api);
    int64_t groups;
    if (groupType == 0) {  /* x [M, K], weight [E, K, N] (plain or transposed), out [M, N] */
        groups = wt->dims[0];
        if (wt->dims[1] != xt->dims[1] || yt->dims[0] != xt->dims[0] || yt->dims[1] != wt->dims[2])
            return fail(PARAM_INVALID, "%s: shapes x [M, K], weight [E, K, N], out [M, N] do not match", api);
        if (xt->dims[1] >= INNER_LIMIT || (!transposed(wt) && wt->dims[2] >= INNER_LIMIT))
            return fail(PARAM_INVALID, "%s: an inner axis (K of x, N of weight) is %d or more", api, INNER_LIMIT);
    } else {  /* x [M, K] a transposed view, weight [K, N] plain, out [E, M, N] */
        groups = yt->dims[0];
        if (!transposed(xt)) return fail(PARAM_INVALID, "%s: groupType 2 needs x as a transposed view", api);
        if (!contiguous(wt)) return fail(PARAM_INVALID, "%s: groupType 2 needs weight contiguous", api);
        if (wt->dims[0] != xt->dims[1] || yt->dims[1] != xt->dims[0] || yt->dims[2] != wt->dims[1])
            return fail(PARAM_INVALID, "%s: shapes x [M, K], weight [K, N], out [E, M, N] do not match", api);
        if (xt->dims[0] >= INNER_LIMIT || wt->dims[1] >= INNER_LIMIT)
            return fail(PARAM_INVALID, "%s: an inner axis (M of x, N of weight) is %d or more", api, INNER_LIMIT);
    }
    if ((s = check_group_list(api, groupList, groups)) != OK) return s;
    return new_executor(op, xt, wt, groupList, yt, groupType, groupListType, false, workspaceSize, executor);
}

#define GMM_V4_ARGS                                                                                         \
    const aclTensorList *x, const aclTensorList *weight, const aclTensorList *biasOptional,                 \
        const aclTensorList *scaleOptional, const aclTensorList *offsetOptional,                            \
        const aclTensorList *antiquantScaleOptional, const aclTensorList *antiquantOffsetOptional,          \
        const aclTensorList *perTokenScaleOptional, const aclTensor *groupListOptional,                     \
        const aclTensorList *activationInputOptional, const aclTensorList *activationQuantScaleOptional,    \
        const aclTensorList *activationQuantOffsetOptional, int64_t splitItem, int64_t groupType,           \
        int64_t groupListType, int64_t actType
#define GMM_OUT_ARGS                                                                                        \
    aclTensorList *out, aclTensorList *activationFeatureOutOptional, aclTensorList *dynQuantScaleOutOptional, \
        uint64_t *workspaceSize, aclOpExecutor **executor
#define UNSUPPORTED                                                                                         \
    const aclTensorList *const unsupported[10] = {                                                          \
        biasOptional, scaleOptional, offsetOptional, antiquantScaleOptional, antiquantOffsetOptional,       \
        perTokenScaleOptional, activationInputOptional, activationQuantScaleOptional,                       \
        activationQuantOffsetOptional,                                                                      \
        activationFeatureOutOptional ? activationFeatureOutOptional : dynQuantScaleOutOptional}

#ifndef CANN_DOUBLE_NO_V4
aclnnStatus aclnnGroupedMatmulV4GetWorkspaceSize(GMM_V4_ARGS, GMM_OUT_ARGS) {
    UNSUPPORTED;
    return gmm_prepare(OP_V4, x, weight, unsupported, groupListOptional, splitItem, groupType, groupListType,
                       actType, NULL, out, workspaceSize, executor);
}
aclnnStatus aclnnGroupedMatmulV4(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor, aclrtStream stream) {
    return run(OP_V4, workspace, workspaceSize, executor, stream);
}
#endif

#ifndef CANN_DOUBLE_NO_V5
aclnnStatus aclnnGroupedMatmulV5GetWorkspaceSize(GMM_V4_ARGS, aclIntArray *tuningConfigOptional, GMM_OUT_ARGS) {
    UNSUPPORTED;
    return gmm_prepare(OP_V5, x, weight, unsupported, groupListOptional, splitItem, groupType, groupListType,
                       actType, tuningConfigOptional, out, workspaceSize, executor);
}
aclnnStatus aclnnGroupedMatmulV5(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor, aclrtStream stream) {
    return run(OP_V5, workspace, workspaceSize, executor, stream);
}
#endif

/* ---- aclnnGroupedMatmulAdd / AddV2: yRef[g] += x_g^T w_g ------------------------------------------- */

static inline aclnnStatus add_prepare(int op, const aclTensor *x, const aclTensor *weight, const aclTensor *groupList,
                               aclTensor *yRef, bool transposeX, bool transposeWeight, int64_t groupType,
                               int64_t groupListType, uint64_t *workspaceSize, aclOpExecutor **executor) {
    const char *api = OP_NAMES[op];
    if (workspaceSize == NULL || executor == NULL)
        return fail(PARAM_NULLPTR, "%s: workspaceSize and executor must not be NULL", api);
    if (!transposeX || transposeWeight || groupType != 2)
        return fail(PARAM_INVALID, "%s: only transposeX=true, transposeWeight=false, groupType 2 are supported", api);
    if (groupListType != 0 && groupListType != 1)
        return fail(PARAM_INVALID, "%s: groupListType %lld is not 0 (cumsum) or 1 (counts)", api,
                    (long long)groupListType);
    aclnnStatus s;
    if ((s = check_tensor(api, "x", x, 2, ACL_FLOAT16, ACL_BF16, ACL_BF16)) != OK) return s;
    if ((s = check_tensor(api, "weight", weight, 2, x->dtype, x->dtype, x->dtype)) != OK) return s;
    if (yRef == NULL) return fail(PARAM_NULLPTR, "%s: yRef is NULL", api);
    if ((s = check_tensor(api, "yRef", yRef, yRef->ndim == 3 ? 3 : 2, ACL_FLOAT, ACL_FLOAT, ACL_FLOAT)) != OK) return s;
    if (!contiguous(x) || !contiguous(weight) || !contiguous(yRef))
        return fail(PARAM_INVALID, "%s: x, weight and yRef must be contiguous", api);
    if ((s = check_group_list(api, groupList, -1)) != OK) return s;
    if (x->dims[0] != weight->dims[0]) return fail(PARAM_INVALID, "%s: x [K, M] and weight [K, N] differ in K", api);
    int64_t y_elems = 1;
    for (int d = 0; d < yRef->ndim; d++) y_elems *= yRef->dims[d];
    bool empty = x->dims[0] * x->dims[1] == 0 || weight->dims[0] * weight->dims[1] == 0;
    if (!empty && y_elems != groupList->dims[0] * x->dims[1] * weight->dims[1])
        return fail(PARAM_INVALID, "%s: yRef has %lld elements, not G*M*N", api, (long long)y_elems);
    return new_executor(op, x, weight, groupList, yRef, groupType, groupListType, empty, workspaceSize, executor);
}

#ifndef CANN_DOUBLE_NO_ADD
aclnnStatus aclnnGroupedMatmulAddGetWorkspaceSize(const aclTensor *x, const aclTensor *weight, const aclTensor *groupList,
                                                  aclTensor *yRef, bool transposeX, bool transposeWeight,
                                                  int64_t groupType, uint64_t *workspaceSize, aclOpExecutor **executor) {
    return add_prepare(OP_ADD, x, weight, groupList, yRef, transposeX, transposeWeight, groupType, 0, workspaceSize,
                       executor);  /* V1 reads cumulative sums */
}
aclnnStatus aclnnGroupedMatmulAdd(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor, aclrtStream stream) {
    return run(OP_ADD, workspace, workspaceSize, executor, stream);
}
#endif

#ifndef CANN_DOUBLE_NO_ADDV2
aclnnStatus aclnnGroupedMatmulAddV2GetWorkspaceSize(const aclTensor *x, const aclTensor *weight,
                                                    const aclTensor *groupList, aclTensor *yRef, bool transposeX,
                                                    bool transposeWeight, int64_t groupType, int64_t groupListType,
                                                    uint64_t *workspaceSize, aclOpExecutor **executor) {
    return add_prepare(OP_ADDV2, x, weight, groupList, yRef, transposeX, transposeWeight, groupType, groupListType,
                       workspaceSize, executor);
}
aclnnStatus aclnnGroupedMatmulAddV2(void *workspace, uint64_t workspaceSize, aclOpExecutor *executor, aclrtStream stream) {
    return run(OP_ADDV2, workspace, workspaceSize, executor, stream);
}
#endif

#ifdef __cplusplus
}  /* extern "C" */
#endif
