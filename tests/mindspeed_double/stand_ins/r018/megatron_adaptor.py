"""MindSpeed core_r0.17.0 / core_r0.18.0 `mindspeed/__init__.py:3` is a bare `import
megatron_adaptor`, which fails unless some `megatron_adaptor` is importable at top level (a
released wheel may put one there; the source tree does not). This empty stand-in lets
`import mindspeed` succeed; MindSpeed patches when `mindspeed.megatron_adaptor` is imported, as on
26.0.0_core_r0.12.1. (Putting mindspeed/ itself on sys.path instead would run its adaptor twice.)"""
