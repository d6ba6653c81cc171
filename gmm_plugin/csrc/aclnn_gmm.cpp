// gmm-plugin's binding of CANN's aclnn grouped matmul (the Python side: gmm_plugin/backends/aclnn.py).
//
// No CANN or torch_npu headers are needed: the opaque types, the two enums and the function
// signatures are declared here as CANN's headers declare them (hicann/opbase
// include/nnopbase/aclnn/acl_meta.h, hicann/runtime include/external/acl/acl_base_rt.h and acl_rt.h,
// hicann/ops-transformer gmm/grouped_matmul/op_host/op_api/aclnn_grouped_matmul_v4.h / _v5.h), and
// every symbol is resolved with dlsym from the libraries Python hands over (CANN's, or the test
// double's). Built with -DGMM_PLUGIN_CANN_HEADERS and CANN's include directory, CANN's own
// declarations replace these and every signature is checked to be identical (docs/npu.md). Tensors
// arrive as op-plugin's ConvertType fills aclCreateTensor for base formats: the storage base address,
// the element offset, strides, the storage dims [storage elements], and a format by rank (Python
// refuses tensors in a private NPU format). The interface to Python is plain C (ctypes), so the
// build needs no torch or pybind headers.
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#ifdef GMM_PLUGIN_CANN_HEADERS
#include <type_traits>

#include "acl/acl_rt.h"  // aclGetRecentErrMsg
#include "aclnn/acl_meta.h"
#include "aclnnop/aclnn_grouped_matmul_v4.h"
#include "aclnnop/aclnn_grouped_matmul_v5.h"
#else
extern "C" {
typedef struct aclTensor aclTensor;
typedef struct aclTensorList aclTensorList;
typedef struct aclIntArray aclIntArray;
typedef struct aclOpExecutor aclOpExecutor;
typedef int32_t aclnnStatus;
typedef void* aclrtStream;
// acl_base_rt.h's enums, with the values the binding passes (UNDEFINED keeps the type signed, as there).
typedef enum { ACL_DT_UNDEFINED = -1, ACL_FLOAT = 0, ACL_FLOAT16 = 1, ACL_INT64 = 9, ACL_BF16 = 27 } aclDataType;
typedef enum {
    ACL_FORMAT_UNDEFINED = -1, ACL_FORMAT_NCHW = 0, ACL_FORMAT_ND = 2, ACL_FORMAT_NCDHW = 30, ACL_FORMAT_NCL = 47
} aclFormat;
}
#endif

using Run = aclnnStatus (*)(void*, uint64_t, aclOpExecutor*, aclrtStream);
using CreateTensor = aclTensor* (*)(const int64_t*, uint64_t, aclDataType, const int64_t*, int64_t, aclFormat,
                                    const int64_t*, uint64_t, void*);
using CreateTensorList = aclTensorList* (*)(const aclTensor* const*, uint64_t);
using DestroyTensor = aclnnStatus (*)(const aclTensor*);
using DestroyTensorList = aclnnStatus (*)(const aclTensorList*);
using DestroyExecutor = aclnnStatus (*)(aclOpExecutor*);
using RecentErrMsg = const char* (*)();
#define GMM_V4_PARAMS                                                                                     \
    const aclTensorList*, const aclTensorList*, const aclTensorList*, const aclTensorList*,               \
        const aclTensorList*, const aclTensorList*, const aclTensorList*, const aclTensorList*,           \
        const aclTensor*, const aclTensorList*, const aclTensorList*, const aclTensorList*, int64_t,      \
        int64_t, int64_t, int64_t
#define GMM_OUT_PARAMS aclTensorList*, aclTensorList*, aclTensorList*, uint64_t*, aclOpExecutor**
using GmmV4Prepare = aclnnStatus (*)(GMM_V4_PARAMS, GMM_OUT_PARAMS);
using GmmV5Prepare = aclnnStatus (*)(GMM_V4_PARAMS, aclIntArray*, GMM_OUT_PARAMS);
// aclnnGroupedMatmulAdd(V2): CANN generates these headers from the op definition (ops-transformer's tree has
// none: gmm/grouped_matmul_add/op_host/grouped_matmul_add_def.cpp, its example's call); checked below where
// the CANN include directory has them.
using AddPrepare = aclnnStatus (*)(const aclTensor*, const aclTensor*, const aclTensor*, aclTensor*, bool, bool,
                                   int64_t, uint64_t*, aclOpExecutor**);
using AddV2Prepare = aclnnStatus (*)(const aclTensor*, const aclTensor*, const aclTensor*, aclTensor*, bool, bool,
                                     int64_t, int64_t, uint64_t*, aclOpExecutor**);

#ifdef GMM_PLUGIN_CANN_HEADERS
#define GMM_SAME(type, fn) static_assert(std::is_same<type, decltype(&fn)>::value, #fn " differs from CANN's header")
GMM_SAME(CreateTensor, aclCreateTensor);
GMM_SAME(CreateTensorList, aclCreateTensorList);
GMM_SAME(DestroyTensor, aclDestroyTensor);
GMM_SAME(DestroyTensorList, aclDestroyTensorList);
GMM_SAME(DestroyExecutor, aclDestroyAclOpExecutor);
GMM_SAME(RecentErrMsg, aclGetRecentErrMsg);
GMM_SAME(GmmV4Prepare, aclnnGroupedMatmulV4GetWorkspaceSize);
GMM_SAME(GmmV5Prepare, aclnnGroupedMatmulV5GetWorkspaceSize);
GMM_SAME(Run, aclnnGroupedMatmulV4);
GMM_SAME(Run, aclnnGroupedMatmulV5);
#if __has_include("aclnnop/aclnn_grouped_matmul_add.h")
#include "aclnnop/aclnn_grouped_matmul_add.h"
GMM_SAME(AddPrepare, aclnnGroupedMatmulAddGetWorkspaceSize);
GMM_SAME(Run, aclnnGroupedMatmulAdd);
#endif
#if __has_include("aclnnop/aclnn_grouped_matmul_add_v2.h")
#include "aclnnop/aclnn_grouped_matmul_add_v2.h"
GMM_SAME(AddV2Prepare, aclnnGroupedMatmulAddV2GetWorkspaceSize);
GMM_SAME(Run, aclnnGroupedMatmulAddV2);
#endif
static_assert(ACL_FLOAT == 0 && ACL_FLOAT16 == 1 && ACL_INT64 == 9 && ACL_BF16 == 27, "aclDataType values");
static_assert(ACL_FORMAT_NCHW == 0 && ACL_FORMAT_ND == 2 && ACL_FORMAT_NCDHW == 30 && ACL_FORMAT_NCL == 47,
              "aclFormat values");
#endif

// One tensor as Python describes it (aclnn.py's _Desc).
struct Desc {
    void* base;             // storage().data(): the base, not data_ptr()
    int64_t offset;         // storage_offset(), in elements
    int32_t dtype;          // aclDataType
    int32_t ndim;
    int64_t dims[8];
    int64_t strides[8];
    int64_t storage_elems;  // storage().nbytes() / itemsize
};
using Alloc = void* (*)(uint64_t bytes);  // a device byte buffer living until the call returns; NULL: failed

struct Library {
    std::vector<void*> handles;
    CreateTensor create_tensor = nullptr;
    CreateTensorList create_list = nullptr;
    DestroyTensor destroy_tensor = nullptr;
    DestroyTensorList destroy_list = nullptr;
    DestroyExecutor destroy_executor = nullptr;  // libnnopbase; older CANN may lack it
    RecentErrMsg recent_err = nullptr;
    GmmV5Prepare v5_prepare = nullptr;
    GmmV4Prepare v4_prepare = nullptr;
    AddV2Prepare add_v2_prepare = nullptr;
    AddPrepare add_prepare = nullptr;
    Run v5 = nullptr, v4 = nullptr, add_v2 = nullptr, add = nullptr;

    template <class F>
    void find(F& slot, const char* name) {  // the first library (in the order given) that has it
        for (void* h : handles)
            if (void* p = dlsym(h, name)) {
                slot = reinterpret_cast<F>(p);
                return;
            }
    }
};

static void say(char* err, size_t len, const std::string& text) { std::snprintf(err, len, "%s", text.c_str()); }

// CANN's text for the last failure, for the Python exception.
static std::string cann_text(const Library& lib) {
    if (!lib.recent_err) return " (no error text: aclGetRecentErrMsg was not found)";
    const char* text = lib.recent_err();
    return text && *text ? std::string(": ") + text : std::string(" (CANN gave no error text)");
}

static std::string failed(const Library& lib, const std::string& what, aclnnStatus status) {
    return what + " returned " + std::to_string(status) + cann_text(lib);
}

// The aclTensors and lists of one call, destroyed when it ends (a list destroys the tensors it holds).
struct Owned {
    const Library& lib;
    std::vector<aclTensor*> tensors;
    std::vector<aclTensorList*> lists;
    ~Owned() {
        for (aclTensorList* l : lists) lib.destroy_list(l);
        for (aclTensor* t : tensors) lib.destroy_tensor(t);
    }
    // op-plugin's ConvertType: view dims and strides, element offset from the base, one storage dim, format by rank.
    aclTensor* tensor(const Desc& d, const char* name, std::string& error) {
        aclFormat format = d.ndim == 3 ? ACL_FORMAT_NCL : d.ndim == 4 ? ACL_FORMAT_NCHW
                           : d.ndim == 5 ? ACL_FORMAT_NCDHW : ACL_FORMAT_ND;
        int64_t storage[1] = {d.storage_elems};
        aclTensor* t = lib.create_tensor(d.dims, d.ndim, static_cast<aclDataType>(d.dtype), d.strides, d.offset,
                                         format, storage, 1, d.base);
        if (!t) error = std::string("aclCreateTensor returned NULL for ") + name;
        else tensors.push_back(t);
        return t;
    }
    aclTensorList* list(aclTensor* t, const char* name, std::string& error) {
        aclTensorList* l = lib.create_list(&t, 1);
        if (!l) {
            error = std::string("aclCreateTensorList returned NULL for ") + name + cann_text(lib);
            return nullptr;
        }
        for (auto it = tensors.begin(); it != tensors.end(); ++it)  // the list owns it now
            if (*it == t) {
                tensors.erase(it);
                break;
            }
        lists.push_back(l);
        return l;
    }
};

// Phase 2: the workspace phase 1 asked for, then the run on `stream` (the executor is single use).
static bool launch(const Library& lib, const char* api, Run run, uint64_t workspace_size, aclOpExecutor* executor,
                   aclrtStream stream, Alloc alloc, std::string& error) {
    void* workspace = nullptr;
    if (workspace_size > 0 && !(workspace = alloc(workspace_size))) {
        // The run that would delete the executor never happens: destroy it here, as op-plugin does with the
        // executor of a phase 1 it does not run (EXEC_GET_MAX_WORKSPACE_CMD, update_op_api_common.h).
        error = std::string(api) + ": allocating its workspace of " + std::to_string(workspace_size) + " bytes failed";
        if (!lib.destroy_executor)
            error += " (its executor is leaked: aclDestroyAclOpExecutor is not exported by the loaded CANN libraries)";
        else if (aclnnStatus status = lib.destroy_executor(executor))
            error += "; " + failed(lib, "aclDestroyAclOpExecutor", status);
        return false;
    }
    aclnnStatus status = run(workspace, workspace_size, executor, stream);
    if (status != 0) error = failed(lib, api, status);
    return status == 0;
}

extern "C" {

// Open the libraries (in search order) and resolve what the binding calls. NULL with the reason in err.
void* gmm_aclnn_open(const char* const* paths, int count, char* err, size_t len) {
    auto* lib = new Library();
    std::string tried;
    for (int i = 0; i < count; i++) {
        if (void* h = dlopen(paths[i], RTLD_LAZY | RTLD_LOCAL)) lib->handles.push_back(h);
        else tried += std::string(tried.empty() ? " " : "; ") + dlerror();
    }
    lib->find(lib->create_tensor, "aclCreateTensor");
    lib->find(lib->create_list, "aclCreateTensorList");
    lib->find(lib->destroy_tensor, "aclDestroyTensor");
    lib->find(lib->destroy_list, "aclDestroyTensorList");
    lib->find(lib->destroy_executor, "aclDestroyAclOpExecutor");
    lib->find(lib->recent_err, "aclGetRecentErrMsg");
    lib->find(lib->v5_prepare, "aclnnGroupedMatmulV5GetWorkspaceSize");
    lib->find(lib->v5, "aclnnGroupedMatmulV5");
    lib->find(lib->v4_prepare, "aclnnGroupedMatmulV4GetWorkspaceSize");
    lib->find(lib->v4, "aclnnGroupedMatmulV4");
    lib->find(lib->add_v2_prepare, "aclnnGroupedMatmulAddV2GetWorkspaceSize");
    lib->find(lib->add_v2, "aclnnGroupedMatmulAddV2");
    lib->find(lib->add_prepare, "aclnnGroupedMatmulAddGetWorkspaceSize");
    lib->find(lib->add, "aclnnGroupedMatmulAdd");
    std::string missing;
    if (!lib->create_tensor) missing += " aclCreateTensor";
    if (!lib->create_list) missing += " aclCreateTensorList";
    if (!lib->destroy_tensor) missing += " aclDestroyTensor";
    if (!lib->destroy_list) missing += " aclDestroyTensorList";
    if (!(lib->v5_prepare && lib->v5) && !(lib->v4_prepare && lib->v4))
        missing += " aclnnGroupedMatmulV5/V4 (and their GetWorkspaceSize)";
    if (missing.empty()) return lib;
    say(err, len, "missing symbols:" + missing + " in " + std::to_string(lib->handles.size()) +
                  " loaded librar" + (lib->handles.size() == 1 ? "y" : "ies") +
                  (tried.empty() ? "" : "; not loaded:" + tried));
    for (void* h : lib->handles) dlclose(h);
    delete lib;
    return nullptr;
}

// Which op versions resolved: "V5", "V4", "AddV2", "Add", "ErrMsg".
int gmm_aclnn_has(const void* handle, const char* what) {
    auto* lib = static_cast<const Library*>(handle);
    std::string w(what);
    if (w == "V5") return lib->v5_prepare && lib->v5;
    if (w == "V4") return lib->v4_prepare && lib->v4;
    if (w == "AddV2") return lib->add_v2_prepare && lib->add_v2;
    if (w == "Add") return lib->add_prepare && lib->add;
    if (w == "ErrMsg") return lib->recent_err != nullptr;
    return 0;
}

// y = GroupedMatmul(x, w) with one x / weight / y tensor (splitItem 3), group_list in the caller's form
// (group_list_type 0: cumulative sums, 1: counts). group_type 0: x [M,K], w [E,K,N], y [M,N];
// group_type 2: x [M,K] (a transposed view), w [K,N], y [E,M,N]. V5 where resolved, else V4.
// Returns 0, or non-zero with the reason in err.
int gmm_aclnn_grouped_matmul(const void* handle, const Desc* x, const Desc* w, const Desc* group_list,
                             const Desc* y, int64_t group_type, int64_t group_list_type, aclrtStream stream,
                             Alloc alloc, char* err, size_t len) {
    const Library& lib = *static_cast<const Library*>(handle);
    std::string error;
    Owned own{lib, {}, {}};
    aclTensor* xt = own.tensor(*x, "x", error);
    aclTensor* wt = xt ? own.tensor(*w, "weight", error) : nullptr;
    aclTensor* gt = wt ? own.tensor(*group_list, "group_list", error) : nullptr;
    aclTensor* yt = gt ? own.tensor(*y, "y", error) : nullptr;
    aclTensorList* xl = yt ? own.list(xt, "x", error) : nullptr;
    aclTensorList* wl = xl ? own.list(wt, "weight", error) : nullptr;
    aclTensorList* yl = wl ? own.list(yt, "y", error) : nullptr;
    if (!yl) return say(err, len, error), 1;
    const bool v5 = lib.v5_prepare && lib.v5;
    const char* api = v5 ? "aclnnGroupedMatmulV5" : "aclnnGroupedMatmulV4";
    uint64_t workspace = 0;
    aclOpExecutor* executor = nullptr;
    const int64_t split_item = 3, act_type = 0;
    aclnnStatus status = v5 ? lib.v5_prepare(xl, wl, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, gt, nullptr,
                                        nullptr, nullptr, split_item, group_type, group_list_type, act_type,
                                        nullptr, yl, nullptr, nullptr, &workspace, &executor)
                       : lib.v4_prepare(xl, wl, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, gt, nullptr,
                                        nullptr, nullptr, split_item, group_type, group_list_type, act_type, yl,
                                        nullptr, nullptr, &workspace, &executor);
    if (status != 0) return say(err, len, failed(lib, std::string(api) + "GetWorkspaceSize", status)), 1;
    if (!launch(lib, api, v5 ? lib.v5 : lib.v4, workspace, executor, stream, alloc, error))
        return say(err, len, error), 1;
    return 0;
}

// y[g] += x[seg g]^T @ w[seg g] into fp32 y (gemm_fusion into main_grad): x [K,M] and w [K,N] contiguous
// (transposeX true, transposeWeight false, groupType 2), y [G,M,N] contiguous. AddV2 takes group_list_type;
// without AddV2 only cumulative sums (group_list_type 0) go to the V1 Add, which reads nothing else.
int gmm_aclnn_grouped_matmul_add(const void* handle, const Desc* x, const Desc* w, const Desc* group_list,
                                 const Desc* y, int64_t group_list_type, aclrtStream stream, Alloc alloc, char* err,
                                 size_t len) {
    const Library& lib = *static_cast<const Library*>(handle);
    const bool v2 = lib.add_v2_prepare && lib.add_v2;
    if (!v2 && !(lib.add_prepare && lib.add))
        return say(err, len, "aclnnGroupedMatmulAdd/AddV2 is not exported by the loaded CANN libraries"), 1;
    if (!v2 && group_list_type != 0)
        return say(err, len, "aclnnGroupedMatmulAdd (V1) reads cumulative sums only; group_list_type " +
                             std::to_string(group_list_type) + " needs aclnnGroupedMatmulAddV2"), 1;
    std::string error;
    Owned own{lib, {}, {}};
    aclTensor* xt = own.tensor(*x, "x", error);
    aclTensor* wt = xt ? own.tensor(*w, "weight", error) : nullptr;
    aclTensor* gt = wt ? own.tensor(*group_list, "group_list", error) : nullptr;
    aclTensor* yt = gt ? own.tensor(*y, "y", error) : nullptr;
    if (!yt) return say(err, len, error), 1;
    const char* api = v2 ? "aclnnGroupedMatmulAddV2" : "aclnnGroupedMatmulAdd";
    uint64_t workspace = 0;
    aclOpExecutor* executor = nullptr;
    const int64_t group_type = 2;
    aclnnStatus status = v2 ? lib.add_v2_prepare(xt, wt, gt, yt, true, false, group_type, group_list_type, &workspace,
                                            &executor)
                       : lib.add_prepare(xt, wt, gt, yt, true, false, group_type, &workspace, &executor);
    if (status != 0) return say(err, len, failed(lib, std::string(api) + "GetWorkspaceSize", status)), 1;
    if (!launch(lib, api, v2 ? lib.add_v2 : lib.add, workspace, executor, stream, alloc, error))
        return say(err, len, error), 1;
    return 0;
}

}  // extern "C"
