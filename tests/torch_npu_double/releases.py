"""torch_npu's grouped-matmul ops release by release: the exact schema strings, and what each
release's op-plugin C++ does with them before CANN runs.

Sources (read from the bare repositories in /work/.mirror; the release tags of Ascend/pytorch pin
op-plugin commits, and for every release below the pinned commit's schemas equal the release
branch's):
  * schemas: Ascend/op-plugin `op_plugin/config/op_plugin_functions.yaml`, the `op_api: [v2.1, newest]`
    (or `all_version`) entries, at the commit pinned by the Ascend/pytorch tag named per release;
  * behaviour: Ascend/op-plugin `op_plugin/ops/opapi/GroupedMatmulKernelNpuOpApi.cpp` and (26.0.0)
    `GroupedMatmulAddNpuOpApi.cpp` at the same commit; 7.1.0-7.3.0 generate npu_grouped_matmul_add_
    from the yaml (`gen_opapi: exec: aclnnGroupedMatmulAdd, x, weight, group_list, self, ...`);
  * `__version__`: Ascend/pytorch `version.txt` at the tag (torch_npu reports the torch version it
    is built for, not the release number: the release cannot be read from it).

Every string below is copied from those files, not edited.
"""
from __future__ import annotations

from dataclasses import dataclass

# ---- npu_grouped_matmul ---------------------------------------------------------------------------

# 6.0.rc3 and 6.0.0 (op-plugin branches 6.0.rc3, 6.0.0; v6.0.0-pytorch2.4.0 pins 65b69b64):
# aclnnGroupedMatmul V1, a host int[] group_list, no group_type / group_list_type.
GMM_6_0 = ("npu_grouped_matmul(Tensor[] x, Tensor[] weight, *, Tensor[]? bias=None, Tensor[]? scale=None, "
           "Tensor[]? offset=None, Tensor[]? antiquant_scale=None, Tensor[]? antiquant_offset=None, "
           "int[]? group_list=None, int? split_item=0, ScalarType? output_dtype=None) -> Tensor[]")

# 7.0.0 (branch 7.0.0; v7.0.0-pytorch2.5.1 pins 8abaa312): tensor group_list (V4), group_type=-1 default.
GMM_7_0 = ("npu_grouped_matmul(Tensor[] x, Tensor[] weight, *, Tensor[]? bias=None, Tensor[]? scale=None, "
           "Tensor[]? offset=None, Tensor[]? antiquant_scale=None, Tensor[]? antiquant_offset=None, "
           "Tensor[]? per_token_scale=None, Tensor? group_list=None, Tensor[]? activation_input=None, "
           "Tensor[]? activation_quant_scale=None, Tensor[]? activation_quant_offset=None, int? split_item=0, "
           "int? group_type=-1, int? group_list_type=0, int? act_type=0, ScalarType? output_dtype=None) -> Tensor[]")
GMM_LIST_7_0 = ("npu_grouped_matmul.List(Tensor[] x, Tensor[] weight, *, Tensor[]? bias=None, Tensor[]? scale=None, "
                "Tensor[]? offset=None, Tensor[]? antiquant_scale=None, Tensor[]? antiquant_offset=None, "
                "Tensor[]? per_token_scale=None, int[]? group_list=None, Tensor[]? activation_input=None, "
                "Tensor[]? activation_quant_scale=None, Tensor[]? activation_quant_offset=None, int? split_item=0, "
                "int? group_type=-1, int? group_list_type=0, int? act_type=0, ScalarType? output_dtype=None) "
                "-> Tensor[]")

# 7.1.0, 7.2.0, 7.3.0 (branches 7.1.0/7.2.0/7.3.0; v7.1.0-pytorch2.6.0 pins 480bc431, v7.2.0-pytorch2.8.0
# 8286bfa4, v7.3.0-pytorch2.9.0 7213914d): + tuning_config, group_type=None (must be passed).
GMM_7_1 = ("npu_grouped_matmul(Tensor[] x, Tensor[] weight, *, Tensor[]? bias=None, Tensor[]? scale=None, "
           "Tensor[]? offset=None, Tensor[]? antiquant_scale=None, Tensor[]? antiquant_offset=None, "
           "Tensor[]? per_token_scale=None, Tensor? group_list=None, Tensor[]? activation_input=None, "
           "Tensor[]? activation_quant_scale=None, Tensor[]? activation_quant_offset=None, int? split_item=0, "
           "int? group_type=None, int? group_list_type=0, int? act_type=0, int[]? tuning_config=None, "
           "ScalarType? output_dtype=None) -> Tensor[]")
GMM_LIST_7_1 = ("npu_grouped_matmul.List(Tensor[] x, Tensor[] weight, *, Tensor[]? bias=None, Tensor[]? scale=None, "
                "Tensor[]? offset=None, Tensor[]? antiquant_scale=None, Tensor[]? antiquant_offset=None, "
                "Tensor[]? per_token_scale=None, int[]? group_list=None, Tensor[]? activation_input=None, "
                "Tensor[]? activation_quant_scale=None, Tensor[]? activation_quant_offset=None, int? split_item=0, "
                "int? group_type=None, int? group_list_type=0, int? act_type=0, ScalarType? output_dtype=None) "
                "-> Tensor[]")

# 26.0.0 (branch 26.0.0; v26.0.0-pytorch2.9.0 pins dedc3167): + x_dtype, weight_dtype, ...; output_dtype int?.
GMM_26_0 = ("npu_grouped_matmul(Tensor[] x, Tensor[] weight, *, Tensor[]? bias=None, Tensor[]? scale=None, "
            "Tensor[]? offset=None, Tensor[]? antiquant_scale=None, Tensor[]? antiquant_offset=None, "
            "Tensor[]? per_token_scale=None, Tensor? group_list=None, Tensor[]? activation_input=None, "
            "Tensor[]? activation_quant_scale=None, Tensor[]? activation_quant_offset=None, int? split_item=0, "
            "int? group_type=None, int? group_list_type=0, int? act_type=0, int[]? tuning_config=None, "
            "int? output_dtype=None, int? x_dtype=None, int? weight_dtype=None, int? scale_dtype=None, "
            "int? per_token_scale_dtype=None) -> Tensor[]")

# ---- npu_grouped_matmul_add_ / npu_grouped_matmul_add ---------------------------------------------

# 7.1.0-7.3.0: no group_list_type; always aclnnGroupedMatmulAdd (V1: group_list is cumulative sums).
ADD_7_1 = ("npu_grouped_matmul_add_(Tensor(a!) self, Tensor x, Tensor weight, Tensor group_list, *, "
           "bool transpose_x=True, bool transpose_weight=False, int group_type=2) -> Tensor(a!)")
# 7.3.0 adds the out-of-place form (not used by the plugin; present so the module is the release's).
ADD_OUT_OF_PLACE_7_3 = ("npu_grouped_matmul_add(Tensor self, Tensor x, Tensor weight, Tensor group_list, *, "
                        "bool transpose_x=True, bool transpose_weight=False, int group_type=2) -> Tensor")
# 26.0.0: + group_list_type, passed on (aclnnGroupedMatmulAddV2) only where op-plugin's
# `has_grouped_matmul_add_v2 && c10_npu::IsAclnnOnly()` holds; else V1, which reads cumulative sums.
ADD_26_0 = ("npu_grouped_matmul_add_(Tensor(a!) self, Tensor x, Tensor weight, Tensor group_list, *, "
            "bool transpose_x=True, bool transpose_weight=False, int group_type=2, int? group_list_type=0) "
            "-> Tensor(a!)")
ADD_OUT_OF_PLACE_26_0 = ("npu_grouped_matmul_add(Tensor self, Tensor x, Tensor weight, Tensor group_list, *, "
                         "bool transpose_x=True, bool transpose_weight=False, int group_type=2, "
                         "int? group_list_type=0) -> Tensor")

# ---- storage formats (Ascend/pytorch torch_npu/csrc/aten/npu_native_functions.yaml at each tag) ------------

GET_NPU_FORMAT = "get_npu_format(Tensor self) -> int"                          # every tag, v6.0.rc3 to v26.0.0
FORMAT_CAST_6_0 = "npu_format_cast(Tensor self, int acl_format) -> Tensor"      # 6.0.x, 7.0.0, 7.1.0
FORMAT_CAST_7_2 = "npu_format_cast(Tensor self, int acl_format, int? customize_dtype=None) -> Tensor"  # 7.2.0, 7.3.0
FORMAT_CAST_26_0 = ("npu_format_cast(Tensor self, int acl_format, *, int? customize_dtype=None, "
                    "int? input_dtype=None) -> Tensor")
# The weight formats op-plugin's npu_grouped_matmul sends to aclnnGroupedMatmulWeightNz
# (GroupedMatmulKernelNpuOpApi.cpp: 7.1.0-7.3.0 `get_npu_format(weight[0]) == ACL_FORMAT_FRACTAL_NZ`; 26.0.0 also
# FRACTAL_NZ_C0_2/_C0_4/_C0_16). 7.0.0 has no such branch: every weight goes to V4, described by ConvertType.
NZ_7_1 = (29,)
NZ_26_0 = (29, 52, 53, 50)

# What op-plugin's npu_grouped_matmul does with group_type 2 (split K), per release:
K_SPLIT_UNMODELLED = "6.0"   # no group_type at all
K_SPLIT_BAD_OUTPUT = "7.0"   # accepted, but y is allocated [x[0].size(0), n] (2-D), which CANN rejects
K_SPLIT_REJECTED = "7.1"     # TORCH_CHECK "group_type currently only support -1 and 0"
K_SPLIT_SUPPORTED = "7.2+"   # y allocated [num_groups, x[0].size(0), n] (create_new_tensor_batch)


@dataclass(frozen=True)
class Release:
    name: str                  # the Ascend Extension for PyTorch release
    tag: str                   # the Ascend/pytorch tag the schemas were read at
    torch_npu_version: str     # torch_npu.__version__ of that tag (version.txt)
    schemas: tuple[str, ...]   # every grouped-matmul op schema the release defines
    k_split: str               # one of the K_SPLIT_* behaviours above
    add_v2_on_aclnn_only_soc: bool = False  # 26.0.0's GroupedMatmulAddNpuOpApi.cpp dispatch
    weight_nz_formats: tuple[int, ...] = ()  # weight formats sent to aclnnGroupedMatmulWeightNz (NZ_*)

    @property
    def namespace(self) -> str:
        return "gmm_double_" + self.name.replace(".", "_")

    @property
    def op_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.split("(")[0].split(".")[0] for s in self.schemas))


RELEASES: dict[str, Release] = {r.name: r for r in (
    Release("6.0.0", "v6.0.0-pytorch2.4.0", "2.4.0.post2", (GMM_6_0, GET_NPU_FORMAT, FORMAT_CAST_6_0),
            K_SPLIT_UNMODELLED),
    Release("7.0.0", "v7.0.0-pytorch2.5.1", "2.5.1", (GMM_7_0, GMM_LIST_7_0, GET_NPU_FORMAT, FORMAT_CAST_6_0),
            K_SPLIT_BAD_OUTPUT),
    Release("7.1.0", "v7.1.0-pytorch2.6.0", "2.6.0", (GMM_7_1, GMM_LIST_7_1, ADD_7_1, GET_NPU_FORMAT,
                                                      FORMAT_CAST_6_0), K_SPLIT_REJECTED, weight_nz_formats=NZ_7_1),
    Release("7.2.0", "v7.2.0-pytorch2.8.0", "2.8.0", (GMM_7_1, GMM_LIST_7_1, ADD_7_1, GET_NPU_FORMAT,
                                                      FORMAT_CAST_7_2), K_SPLIT_SUPPORTED, weight_nz_formats=NZ_7_1),
    Release("7.3.0", "v7.3.0-pytorch2.9.0", "2.9.0", (GMM_7_1, GMM_LIST_7_1, ADD_7_1, ADD_OUT_OF_PLACE_7_3,
                                                      GET_NPU_FORMAT, FORMAT_CAST_7_2), K_SPLIT_SUPPORTED,
            weight_nz_formats=NZ_7_1),
    Release("26.0.0", "v26.0.0-pytorch2.9.0", "2.9.0.post2",
            (GMM_26_0, GMM_LIST_7_1, ADD_OUT_OF_PLACE_26_0, ADD_26_0, GET_NPU_FORMAT, FORMAT_CAST_26_0),
            K_SPLIT_SUPPORTED, add_v2_on_aclnn_only_soc=True, weight_nz_formats=NZ_26_0),
)}

# c10_npu::SocVersion (Ascend/pytorch torch_npu/csrc/core/npu/NpuVariables.h at v2.9.0-26.0.0), the
# value torch_npu.npu.utils.get_soc_version() returns; IsAclnnOnly() is `GetSocVersion() >= Ascend950`.
SOC_VERSIONS = {
    "Ascend910B1": 220, "Ascend910B2": 221, "Ascend910B3": 223, "Ascend910B4": 224,  # Atlas A2
    "Ascend910_9391": 250, "Ascend910_9392": 251, "Ascend910_9381": 252,             # Atlas A3
    "Ascend950": 260,
}
ASCEND950 = SOC_VERSIONS["Ascend950"]
