"""torch_npu.contrib.transfer_to_npu: on a real NPU it redirects torch.cuda to torch.npu at import;
MindSpeed imports it for that side effect only (mindspeed/megatron_adaptor.py:11). On a CPU there is
nothing to redirect to, so it does nothing."""
