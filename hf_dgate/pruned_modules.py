"""What a pruned model needs beyond smaller tensors: forwards for modules left with nothing to compute, and the
reshaping of a freshly built model to a recorded pruned structure (`shrink`: the one way every reload rebuilds it).

This file is self-contained on purpose (it imports torch only): hf_dgate uses it, and the export copies it
verbatim into `modeling_dgate_pruned.py`, so people who load an export with `trust_remote_code=True` run this
same code, not a second copy of it. Every name and size it reads from a config is checked as data.
"""

import copy

import torch
from torch import nn


class ZeroHeadAttention:
    """Marker base: an attention module with no head left. Its output is the output projection's bias."""


class ZeroInputConv1D:
    """Marker base: transformers' Conv1D with no input feature left (its forward cannot view a 0-width input), or a
    depthwise convolution with no channel left (torch refuses zero groups)."""


class KeepsPrunedAttention:
    """Marker base: a module that replaces its attention by a new one built from the config at run time (BigBird
    swaps block-sparse for full attention on short inputs, `set_attention_type`); the new one keeps the pruned one's
    head counts and, where no head is left, its no-head forward."""


def no_head_forward(self, hidden_states=None, *args, **kwargs):
    """Forward of an attention layer without heads: the output projection applied to an empty context."""
    if hidden_states is None:
        hidden_states = kwargs.pop("hidden_states", None)
    if hidden_states is None:  # DistilBERT in transformers 4.x passes query=, key=, value=
        hidden_states = kwargs["query"]
    cache = kwargs.get("past_key_values", kwargs.get("layer_past"))
    if cache is None:
        cache = next((a for a in args if hasattr(a, "update") and hasattr(a, "get_seq_length")), None)
    layer_idx = getattr(self, "layer_idx", None)
    cross = kwargs.get("key_value_states") is not None or getattr(self, "is_cross_attention", False)
    if cache is not None and layer_idx is not None and hasattr(cache, "update") and not cross:
        cache = getattr(cache, "self_attention_cache", cache)
        # A cache layer reports its length from its keys, and an empty tensor reads as length 0, which would
        # shift positions during generation: keep one zero "head" of width 1 as a length marker.
        b, t = hidden_states.shape[0], hidden_states.shape[1]
        marker = hidden_states.new_zeros(b, 1, t, 1)
        cache.update(marker, marker, layer_idx)
    context = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
    out = self.get_submodule(self._dgate_out)(context) if self._dgate_out else context
    at = getattr(self, "_dgate_residual", None)  # the module adds the residual itself (BLOOM's attention)
    if at is not None:
        residual = kwargs["residual"] if "residual" in kwargs else args[at] if at < len(args) else None
        if residual is not None:
            out = out + residual
    post_norm = getattr(self, "_dgate_post_norm", None)  # the module adds its input and norms (ALBERT)
    if post_norm:
        out = self.get_submodule(post_norm)(hidden_states + out)
    if getattr(self, "_dgate_single", False):
        return out
    extras = getattr(self, "_dgate_extras", None) or [None]  # what the original returned after its output
    values = (out, *[getattr(self, a) if a else None for a in extras])
    nested = getattr(self, "_dgate_nested", None)  # tuples of tuples (I-BERT: its outputs and their scales)
    if nested and len(nested) == len(values):
        values = tuple((v,) if inner else v for v, inner in zip(values, nested))
    return list(values) if getattr(self, "_dgate_list", False) else values


def returns_one_value(cls):
    """Does `cls.forward` return one value rather than a tuple (a hybrid's linear attention returns its output
    alone, softmax attention (output, weights))? Read from the source: every `return` of the forward itself (not
    of functions nested in it) gives a non-tuple expression."""
    found, tuples = _returns(cls)
    return bool(found) and all(v is not None and not _tuple_like(v, tuples) for v in found)


def returns_list(cls):
    """Does `cls.forward` return a list (OpenAI GPT's attention: `[a] + attn_outputs[1:]`, which its block extends
    with `+`)? Every `return` gives a list display, a concatenation starting with one, or a name assigned one."""
    import ast

    found, _ = _returns(cls)
    fn = _forward_tree(cls)
    lists = set()
    for node in ast.walk(fn) if fn is not None else ():
        if isinstance(node, ast.Assign) and _list_like(node.value, set()):
            lists.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return bool(found) and all(v is not None and _list_like(v, lists) for v in found)


def _list_like(node, lists):
    import ast

    if isinstance(node, ast.List):
        return True
    if isinstance(node, ast.BinOp):
        return _list_like(node.left, lists)
    return isinstance(node, ast.Name) and node.id in lists


def returned_extras(cls):
    """What `cls.forward` returns after its output when every `return` gives a tuple of one length: per position the
    module attribute returned there (`self.dense_bias`, which GPT-NeoX-Japanese's block adds itself), else None;
    None when the source does not say."""
    import ast

    found, _ = _returns(cls)
    if not found or not all(isinstance(v, ast.Tuple) for v in found) or len({len(v.elts) for v in found}) != 1:
        return None
    extras = []
    for i in range(1, len(found[0].elts)):
        attrs = {
            e.attr if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id == "self" else None
            for e in (v.elts[i] for v in found)
        }
        extras.append(attrs.pop() if len(attrs) == 1 else None)
    return extras


def post_norm_inside(cls):
    """The norm `cls.forward` applies to its first input plus its output (ALBERT's attention ends with
    `self.LayerNorm(hidden_states + attn_output)`), by attribute name; None where the source shows no such call."""
    import ast

    fn = _forward_tree(cls)
    if fn is None or len(fn.args.args) < 2:
        return None
    first = fn.args.args[1].arg
    for node in ast.walk(fn):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args):
            continue
        owner, arg = node.func.value, node.args[0]
        if isinstance(owner, ast.Name) and owner.id == "self" and isinstance(arg, ast.BinOp):
            if isinstance(arg.op, ast.Add) and first in [getattr(x, "id", None) for x in (arg.left, arg.right)]:
                if "norm" in node.func.attr.lower():
                    return node.func.attr
    return None


def returned_tuples(cls):
    """Per position of what `cls.forward` returns, whether it is itself a tuple in every `return` (a name assigned
    tuples: I-BERT's attention returns `outputs, output_scaling_factor`, each a tuple); None when not all returns
    are tuples of one length, or none of their positions is one."""
    import ast

    found, tuples = _returns(cls)
    if not found or not all(isinstance(v, ast.Tuple) for v in found) or len({len(v.elts) for v in found}) != 1:
        return None
    nested = [all(isinstance(v.elts[i], ast.Name) and v.elts[i].id in tuples for v in found)
              for i in range(len(found[0].elts))]
    return nested if any(nested) else None


def _returns(cls):
    """The expressions `cls.forward` itself returns, and the names it assigns a tuple to."""
    import ast

    fn = _forward_tree(cls)
    if fn is None:
        return [], set()
    found, tuples = [], set()  # returned expressions; names assigned a tuple somewhere in the forward
    todo = list(fn.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(node, ast.Return):
            found.append(node.value)
        if isinstance(node, ast.Assign) and _tuple_like(node.value, set()):
            tuples.update(t.id for t in node.targets if isinstance(t, ast.Name))
        todo.extend(ast.iter_child_nodes(node))
    return found, tuples


def _forward_tree(cls):
    """The syntax tree of `cls.forward` (None when its source cannot be read)."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError, AttributeError):
        return None
    return tree.body[0] if tree.body and isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)) else None


def _tuple_like(node, tuples):
    """A tuple display, a concatenation with one, `tuple(...)`, or a name assigned a tuple."""
    import ast

    if isinstance(node, (ast.Tuple, ast.List)):  # (a list of outputs is a sequence too: OpenAI GPT)
        return True
    if isinstance(node, ast.BinOp):
        return _tuple_like(node.left, tuples) or _tuple_like(node.right, tuples)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "tuple":
        return True
    if isinstance(node, ast.IfExp):
        return _tuple_like(node.body, tuples) or _tuple_like(node.orelse, tuples)
    return isinstance(node, ast.Name) and node.id in tuples


def no_input_forward(self, x):
    """Forward of a GPT-2 Conv1D without inputs: its bias; of a depthwise convolution without channels: an empty
    activation of the size its convolution would give (torch cannot run one with zero groups)."""
    if isinstance(self, nn.modules.conv._ConvNd):
        size = []
        for i, n in enumerate(x.shape[2:]):
            k, s, d = self.kernel_size[i], self.stride[i], self.dilation[i]
            p = 0 if isinstance(self.padding, str) else self.padding[i]  # "valid": 0; "same" keeps the size
            size.append(n if self.padding == "same" else (n + 2 * p - d * (k - 1) - 1) // s + 1)
        return x.new_zeros(x.shape[0], 0, *size)
    return x.new_zeros(*x.shape[:-1], self.nf) + self.bias.to(x.dtype)


def set_attention_type_keeping_heads(self, value, *args, **kwargs):
    """`set_attention_type` of a pruned module: the attention the config builds gets the pruned one's int sizes
    (head counts, head size, width) and, where it had no head left, the no-head forward."""
    before = dict(self.named_children())
    super(type(self), self).set_attention_type(value, *args, **kwargs)
    for name, new in self.named_children():
        old = before.get(name)
        if old is None or new is old:
            continue
        for key, size in vars(old).items():
            if isinstance(size, int) and not isinstance(size, bool) and not key.startswith("_"):
                if isinstance(vars(new).get(key), int) and not isinstance(vars(new)[key], bool):
                    setattr(new, key, size)
        if isinstance(old, ZeroHeadAttention):
            make_no_head(new, old._dgate_out)


_CLASSES = {}
_PREFIXES = {ZeroHeadAttention: "NoHead", ZeroInputConv1D: "NoInput", KeepsPrunedAttention: "Pruned"}


def _subclass(cls, marker, methods):
    key = (cls, marker)
    if key not in _CLASSES:
        _CLASSES[key] = type(_PREFIXES[marker] + cls.__name__, (cls, marker), {**methods, "__module__": __name__})
    return _CLASSES[key]


def make_no_head(module, out):
    """Turn an attention module into one without heads whose output is its `out` submodule's bias."""
    module._dgate_out = out
    module._dgate_residual = residual_argument(type(module))
    if not isinstance(module, ZeroHeadAttention):
        module._dgate_single = returns_one_value(type(module))
        module._dgate_list = returns_list(type(module))
        module._dgate_extras = returned_extras(type(module))
        module._dgate_nested = returned_tuples(type(module))
        module._dgate_post_norm = post_norm_inside(type(module))
        module.__class__ = _subclass(type(module), ZeroHeadAttention, {"forward": no_head_forward})


def residual_argument(cls):
    """Where `cls.forward` takes a `residual` argument that it adds to its output itself (BLOOM's attention): its
    index among the positional arguments after the hidden states; None without one."""
    import inspect

    try:
        names = list(inspect.signature(cls.forward).parameters)[1:]  # (without self)
    except (TypeError, ValueError):
        return None
    return names.index("residual") - 1 if "residual" in names[1:] else None


def make_no_input(module):
    if not isinstance(module, ZeroInputConv1D):
        module.__class__ = _subclass(type(module), ZeroInputConv1D, {"forward": no_input_forward})


def keep_pruned_on_switch(module):
    """Make a module whose `set_attention_type` rebuilds its attention from the config keep the pruned sizes."""
    if not isinstance(module, KeepsPrunedAttention) and callable(getattr(module, "set_attention_type", None)):
        module.__class__ = _subclass(type(module), KeepsPrunedAttention,
                                     {"set_attention_type": set_attention_type_keeping_heads})


def own_head_config(module, n_heads, n_kv):
    """Give an attention module a config copy with its own head counts (Phi-3 reads them from its config)."""
    module.config = copy.copy(module.config)
    module.config.num_attention_heads, module.config.num_key_value_heads = n_heads, n_kv


def select_head_inputs(module, args, heads, of):
    """Give an attention module that lost heads only its kept heads' share of per-head tensors it receives from
    outside (a position bias the model builds once for all layers from the config's head count: ALiBi as BLOOM's
    `alibi` and MPT's `position_bias`, CPM-Ant's learned segment bias): `heads` are the kept heads' numbers among
    the `of` heads of that tensor. The selection is data on the module (`_dgate_head_inputs`); a forward pre-hook
    applies it, and a second selection on an already pruned module composes with the first."""
    old = getattr(module, "_dgate_head_inputs", None)
    if old:
        heads, of = [old["heads"][h] for h in heads], old["of"]
    module._dgate_head_inputs = {"args": list(args), "heads": [int(h) for h in heads], "of": int(of)}
    if not getattr(module, "_dgate_head_hook", False):
        module.register_forward_pre_hook(_head_inputs_hook, with_kwargs=True)
        module._dgate_head_hook = True


def _head_inputs_hook(module, args, kwargs):
    import inspect

    sel = getattr(module, "_dgate_head_inputs", None)
    if not sel:
        return None
    names = [p for p in inspect.signature(module.forward).parameters]
    args = list(args)
    for name in sel["args"]:
        if name in kwargs:
            kwargs[name] = _take_heads(kwargs[name], sel["heads"], sel["of"])
        elif name in names and names.index(name) < len(args):
            args[names.index(name)] = _take_heads(args[names.index(name)], sel["heads"], sel["of"])
    return tuple(args), kwargs


def _take_heads(t, heads, of):
    """The kept heads of a per-head bias: (batch, heads, queries, keys) as a 4-d tensor, else dim 0 as (batch x
    `of` heads), heads varying fastest; anything else as is (the module then fails loudly on the width, and the
    export's numerical check stands behind every layout)."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    idx = torch.tensor(heads, dtype=torch.long, device=t.device)
    if t.dim() == 4 and t.shape[1] == of:
        return t[:, idx]
    if t.shape[0] % of:
        return t
    return t.reshape(t.shape[0] // of, of, *t.shape[1:])[:, idx].reshape(-1, *t.shape[1:])


# ---- rebuilding a recorded structure (the "rebuild" spec in config.dgate_pruning) -------------------------------
def _name(value, attribute=False):
    """Names come from config.json (data, never code): dotted identifiers only; attributes set must be public."""
    ok = isinstance(value, str) and (value == "" or all(p.isidentifier() or p.isdigit() for p in value.split(".")))
    if not ok or (attribute and (value == "" or value.startswith("_"))):
        raise ValueError(f"config.dgate_pruning holds an invalid name {value!r}; re-export the model with hf_dgate.")
    return value


def _int(value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"config.dgate_pruning holds {value!r} where a size (an int >= 0) belongs; re-export it.")
    return value


def shrink(model, spec):
    """Reshape a freshly built model to `spec` (tensor shapes, int attributes, per-module head configs, modules
    left without heads or inputs) before its weights are loaded: the one rebuild of every reload (AutoPrunedModel
    and the generated loader call it with the record's spec)."""
    if hasattr(spec, "to_dict"):  # record.py's RebuildSpec
        spec = spec.to_dict()
    kinds = {"shapes": dict, "attrs": dict, "no_head": dict, "no_input": list}
    if not isinstance(spec, dict) or not all(isinstance(spec.get(k), t) for k, t in kinds.items()):
        raise ValueError("config.dgate_pruning has no readable rebuild spec; re-export the model with hf_dgate.")
    for name, shape in spec["shapes"].items():
        module_name, _, param = _name(name).rpartition(".")
        module = model.get_submodule(module_name)
        _name(param, attribute=True)
        old = getattr(module, param)
        new = torch.empty([_int(d) for d in shape], dtype=old.dtype, device=old.device)
        if param in module._buffers:  # a per-group buffer (a router's per-expert bias)
            module._buffers[param] = new
        else:
            setattr(module, param, nn.Parameter(new, requires_grad=old.requires_grad))
    for module_name, attrs in spec["attrs"].items():
        module = model.get_submodule(_name(module_name))
        for key, value in attrs.items():
            if isinstance(value, float) and key in ("variance_epsilon", "eps", "epsilon"):  # a rescaled RMSNorm's
                if not 0.0 <= value < 1.0:
                    raise ValueError(f"config.dgate_pruning holds {value!r} as a norm's epsilon; re-export the model.")
                setattr(module, key, value)
                module._dgate_rescaled = True
                continue
            setattr(module, _name(key, attribute=True), _int(value))
    for module_name, heads in spec.get("head_configs", {}).items():
        own_head_config(model.get_submodule(_name(module_name)), _int(heads[0]), _int(heads[1]))
    for module_name, sel in (spec.get("head_inputs") or {}).items():
        if not isinstance(sel, dict) or not isinstance(sel.get("args"), list) or not isinstance(sel.get("heads"), list):
            raise ValueError("config.dgate_pruning has a malformed head_inputs entry; re-export the model.")
        of = _int(sel.get("of"))
        heads = [_int(h) for h in sel["heads"]]
        if any(h >= of for h in heads):
            raise ValueError("config.dgate_pruning selects a head beyond the count it names; re-export the model.")
        select_head_inputs(model.get_submodule(_name(module_name)), [_name(a, attribute=True) for a in sel["args"]],
                           heads, of)
    for module_name, out in spec["no_head"].items():
        make_no_head(model.get_submodule(_name(module_name)), _name(out) if out else None)
    for module_name in spec["no_input"]:
        make_no_input(model.get_submodule(_name(module_name)))
    pruned = {*spec["attrs"], *spec["no_head"]}  # (a spec translated from the per-layer lists names no wrapper)
    for module_name in [*spec.get("keep_on_switch", []), *pruned, *{n.rpartition(".")[0] for n in pruned}]:
        if module_name:  # (only where it has set_attention_type; never the model itself)
            keep_pruned_on_switch(model.get_submodule(_name(module_name)))
    for module in model.modules():  # an empty weight has nothing to initialise, and some families' inits divide by
        # its width (RWKV's gain, the LeCun init of SigLIP): transformers skips a module marked initialised (its
        # tensors all come from the checkpoint); modules with buffers are left alone (non-persistent ones need init)
        own = list(module.parameters(recurse=False))
        if any(p.numel() == 0 for p in own) and not any(True for _ in module.buffers(recurse=False)):
            module._is_hf_initialized = True
