"""The patch machinery of `mindspeed/patch_utils.py` (26.0.0_core_r0.12.1), the parts that matter
beside gmm-plugin:

- register_patch only records (:171-186); apply_patches() applies each Patch (:110-133):
  `setattr(orig_module, name, final)` (:127), then every module in sys.modules with an attribute of
  the SAME name holding the SAME object as the original gets the new one too (:128-131), so
  `from x import GroupedMLP` aliases follow.
- A new function whose __name__ ends in 'wrapper' or 'decorator' is stacked as a decorator of the
  original instead of replacing it (:71-73, :123-124); a second plain replacement raises
  'the patch of {} exist !' (:75-76).
- A target name that does not exist yet is created as None first (:162-163).
- remove_patch() restores only where the attribute still holds what MindSpeed installed
  (identity, :103-105).
"""
import importlib
import sys


class Patch:
    def __init__(self, orig_func_name, new_func):
        self.orig_module_name, self.orig_func_name = orig_func_name.rsplit(".", 1)
        self.orig_module = self.orig_func = None
        self.patch_func = self.final_patch_func = None
        self.wrappers = []
        self.is_applied = False
        self.set_patch_func(new_func)

    def set_patch_func(self, new_func, force_patch=False):
        if getattr(new_func, "__name__", "").endswith(("wrapper", "decorator")):
            if new_func not in self.wrappers:
                self.wrappers.append(new_func)
        else:
            if self.patch_func and not force_patch:
                raise RuntimeError("the patch of {} exist !".format(self.orig_func_name))
            self.patch_func = new_func
        self.is_applied = False

    def _owner(self):
        # A class attribute ('...MoELayer.__init__'): the owner is the class in its module.
        try:
            return importlib.import_module(self.orig_module_name)
        except ModuleNotFoundError:
            module_name, cls_name = self.orig_module_name.rsplit(".", 1)
            return getattr(importlib.import_module(module_name), cls_name)

    def apply_patch(self):
        if self.is_applied:
            return
        owner = self._owner()
        if not hasattr(owner, self.orig_func_name):
            setattr(owner, self.orig_func_name, None)  # :162-163
        current = getattr(owner, self.orig_func_name)
        if self.orig_module is None:
            self.orig_module, self.orig_func = owner, current
        final = self.patch_func if self.patch_func is not None else self.orig_func
        for wrapper in self.wrappers:
            final = wrapper(final)
        setattr(self.orig_module, self.orig_func_name, final)
        for value in list(sys.modules.values()):
            if hasattr(value, self.orig_func_name) and getattr(value, self.orig_func_name) is current:
                setattr(value, self.orig_func_name, final)
        self.is_applied, self.final_patch_func = True, final

    def remove_patch(self):
        for key, value in list(sys.modules.items()):
            if "mindspeed" in key:
                continue
            if hasattr(value, self.orig_func_name) and getattr(value, self.orig_func_name) is self.final_patch_func:
                setattr(value, self.orig_func_name, self.orig_func)
        if getattr(self.orig_module, self.orig_func_name, None) is self.final_patch_func:
            setattr(self.orig_module, self.orig_func_name, self.orig_func)
        self.patch_func = self.final_patch_func = None
        self.is_applied = False


class MindSpeedPatchesManager:
    patches_info = {}

    @staticmethod
    def register_patch(orig_func_name, new_func=None, force_patch=False):
        info = MindSpeedPatchesManager.patches_info
        if orig_func_name not in info:
            info[orig_func_name] = Patch(orig_func_name, new_func)
        else:
            info[orig_func_name].set_patch_func(new_func, force_patch)

    @staticmethod
    def apply_patches():
        for patch in MindSpeedPatchesManager.patches_info.values():
            patch.apply_patch()

    @staticmethod
    def remove_patches():
        for patch in MindSpeedPatchesManager.patches_info.values():
            patch.remove_patch()
