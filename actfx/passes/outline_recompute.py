"""Blocks ``Config.recompute_modules`` names inside a graph torch.export captured, outlined into
one call each, so the rewrite reruns them in backward as it does a module fx kept whole.

Why: export flattens the module tree. A Hugging Face block is a run of ATen calls tagged with its
path (``nn_module_stack``), and a setting naming it matched nothing, silently, so the planner
could offer no recompute on those models. The run becomes a GraphModule of its own whose inputs
are everything it reads from outside (parameters too: it owns no state, so the model's
parameters and state_dict are unchanged) and whose outputs are what the rest of the graph reads.
The call is marked ``CHECKPOINTED`` with the block's path, for ``checkpoint_site``.

A block that updates the model's state in place (BatchNorm's running statistics) has its rerun
write into copies, so the batch is counted once. A block is left as it was, with the reason
returned, where its nodes are not one stretch once independent nodes move aside (something
outside reads a value of the block and feeds the block again), where it writes into another
tensor it does not own, or where a value it hands out is neither a tensor nor a number.
"""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import Graph, GraphModule, Node

from actfx.passes.capture import CHECKPOINTED
from actfx.passes.export_capture import is_input_guard
from actfx.passes.graph_facts import GraphFacts

OUTLINED_PREFIX = "_actfx_export_recompute_"
BLOCK_PATH = "actfx_recomputed_block"  # node.meta of the outlined call: the block's path in the graph's module


class OutlinedBlock(nn.Module):
    """An outlined block, called without module hooks: it is no module of the user's model (its
    hooks ran inside the capture already), and a hook on its inputs would see the parameters it
    takes (PyTorch's MemTracker hooked them and then failed in the rerun's nested backward)."""

    def __init__(self, body: GraphModule, written_inputs: tuple = ()):
        super().__init__()
        object.__setattr__(self, "body", body)  # not a submodule: it holds no state to list
        # inputs it updates in place (BatchNorm's running statistics): the rerun writes copies
        self.written_inputs = written_inputs

    def forward(self, *args):
        return self.body.forward(*args)

    def __call__(self, *args):
        return self.forward(*args)


def outlinable(graph: Graph, paths, prefix: str = "") -> set:
    """Those of ``paths`` that ``outline_recomputed`` would outline from ``graph`` (the planner
    offers only these)."""
    facts = GraphFacts(graph)
    found = set()
    for path in paths:
        region = _region(graph, facts, _relative(path, prefix))
        if region and _checked(graph, region, facts)[0] is None:
            found.add(path)
    return found


def outline_recomputed(gm: GraphModule, paths, prefix: str = "") -> tuple[dict, dict]:
    """Outline each of ``paths`` (full module paths; the graph is the module at ``prefix``) that
    runs in ``gm``'s graph. Returns {name: OutlinedBlock} to set on the module the
    forward runs on, and {path: why not} for blocks left inline, as ``(outlined, refused)``."""
    outlined, refused = {}, {}
    facts = GraphFacts(gm.graph)
    for path in paths:
        inner = _relative(path, prefix)
        region = _region(gm.graph, facts, inner)
        if not region:
            continue  # not run by this graph (another capture's, or a branch not taken)
        why, moved = _checked(gm.graph, region, facts)
        if why is not None:
            refused[path] = why
            continue
        name = OUTLINED_PREFIX + path.replace(".", "_")
        outlined[name] = _outline(gm, region, moved, name, inner, facts)
    if outlined:
        gm.graph.lint()
        gm.recompile()
    return outlined, refused


def _region(graph: Graph, facts: GraphFacts, inner: str | None) -> list:
    """The calls traced inside the module at ``inner`` (None: not in this graph; "": the whole
    graph, a block captured on its own), in graph order."""
    if inner is None:
        return []
    return [n for n in graph.nodes if n.op in ("call_function", "call_method", "call_module")
            and (_within(facts.module_path(n), inner) if inner else not is_input_guard(n))]


def _relative(path: str, prefix: str) -> str | None:
    """``path`` inside the module at ``prefix``: "" for that module itself, None outside it."""
    if path == prefix:
        return ""
    if not prefix:
        return path
    return path[len(prefix) + 1:] if path.startswith(prefix + ".") else None


def _within(module_path: str | None, inner: str) -> bool:
    return module_path is not None and (module_path == inner or module_path.startswith(inner + "."))


def _checked(graph: Graph, region: list, facts: GraphFacts) -> tuple[str | None, list | None]:
    """(why the block cannot be outlined, None where it can; the nodes that move after it)."""
    members = set(region)
    for node in region:
        written = facts.mutated_input(node, None)
        if written is not None and written not in members and written.op != "get_attr":
            return f"it writes into {written.name}, a tensor it does not own ({node.format_node()})", None
        for user in node.users:
            if user not in members and not _tensor_or_number(node):
                return f"{node.name}, which the rest of the graph reads, is neither a tensor nor a number", None
    moved = _moved_after(graph, region)
    if moved is None:
        return "a node outside it reads one of its values and feeds it again", None
    return None, moved


def _tensor_or_number(node: Node) -> bool:
    """A tensor, or a size (export shares one layer's size arithmetic with the next: Mixtral)."""
    return isinstance(node.meta.get("val"), (torch.Tensor, torch.SymInt, int, float, bool))


def _moved_after(graph: Graph, region: list) -> list | None:
    """The nodes between the block's first and last that read from it (they move after the
    outlined call), or None where one of them also feeds the block."""
    members = set(region)
    order = {n: i for i, n in enumerate(graph.nodes)}
    first, last = order[region[0]], order[region[-1]]
    downstream: set = set()
    for node in graph.nodes:
        if not first < order[node] < last or node in members:
            continue
        if any(a in members or a in downstream for a in node.all_input_nodes):
            downstream.add(node)
    for node in region:
        if any(a in downstream for a in node.all_input_nodes):
            return None
    return [n for n in graph.nodes if n in downstream]


def _outline(gm: GraphModule, region: list, moved: list, name: str, path: str, facts: GraphFacts) -> GraphModule:
    """``region`` as one call of a new OutlinedBlock named ``name``; ``moved``: the nodes between
    its first and last that read from it (``_moved_after``), which go after the call."""
    graph = gm.graph
    members = set(region)
    inputs = list(dict.fromkeys(a for n in region for a in n.all_input_nodes if a not in members))
    outputs = [n for n in region if any(u not in members for u in n.users)]
    body = Graph()
    env: dict = {}
    for node in inputs:
        env[node] = body.placeholder(node.name)
        env[node].meta = dict(node.meta)
    for node in region:
        env[node] = body.node_copy(node, env.__getitem__)
    body.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[n] for n in outputs))
    written = {w for n in region for w in (facts.mutated_input(n, None), *_running_statistics(n))} - {None}
    module = OutlinedBlock(GraphModule(gm, body, f"Recomputed_{name[len(OUTLINED_PREFIX):]}"),
                           tuple(i for i, node in enumerate(inputs) if node in written))
    gm.add_submodule(name, module)
    with graph.inserting_after(region[-1]):
        call = graph.call_module(name, tuple(inputs))
    call.meta[CHECKPOINTED] = True
    call.meta[BLOCK_PATH] = path
    call.meta["actfx_replaces"] = tuple(n.name for n in region)  # show's "before": what they saved
    # the whole graph (path ""): no stack, so the rewrite names it by the captured module's path
    call.meta["nn_module_stack"] = _stack_down_to(region[0].meta.get("nn_module_stack") or {}, path) if path else {}
    if len(outputs) == 1:
        outputs[0].replace_all_uses_with(call, delete_user_cb=lambda user: user not in members)
    anchor = call
    for i, out in enumerate(outputs if len(outputs) > 1 else ()):
        with graph.inserting_after(anchor):
            anchor = graph.call_function(operator.getitem, (call, i))
        anchor.meta = {"val": out.meta.get("val"), "nn_module_stack": call.meta["nn_module_stack"]}
        out.replace_all_uses_with(anchor, delete_user_cb=lambda user: user not in members)
    for node in moved:  # readers of the block between its first and last node go after the call
        anchor.append(node)
        anchor = node
    for node in reversed(region):
        graph.erase_node(node)
    return module


def _stack_down_to(stack: dict, path: str) -> dict:
    """A node's module stack cut after ``path``'s entry: the outlined call runs in the block."""
    kept = {}
    for key, entry in stack.items():
        kept[key] = entry
        if entry[0] == path:
            break
    return kept


_BATCH_NORMS = (F.batch_norm, torch.batch_norm)


def _running_statistics(node: Node) -> tuple:
    """The running mean and variance a training batch norm updates without an in-place op of its own."""
    if node.op != "call_function" or node.target not in _BATCH_NORMS:
        return ()
    args = dict(zip(("input", "running_mean", "running_var"), node.args))
    found = (args.get("running_mean", node.kwargs.get("running_mean")),
             args.get("running_var", node.kwargs.get("running_var")))
    return tuple(n for n in found if isinstance(n, Node))
