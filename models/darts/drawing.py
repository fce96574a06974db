"""Drawing a DARTS cell as a graph (matplotlib, imported on first use).

A cell of a :class:`~models.darts.Genotype` is a DAG: the two cell inputs
``c_{k-2}``, ``c_{k-1}`` (nodes 0 and 1), the intermediate nodes ``2 ..``,
each reading two earlier nodes through one op each, and the output
``c_{k}``, the channel concatenation of the ``concat`` nodes. The layout
puts the inputs on the left, the intermediate nodes in a column per node,
the output on the right, and names each edge's op at its middle (the
figures of Liu et al., *DARTS*, ICLR 2019, Fig. 4-5, drawn without
graphviz).
"""

from collections.abc import Sequence

import numpy as np

from models.darts.genotype import Genotype


def node_positions(num_nodes: int) -> dict[int | str, tuple[float, float]]:
  """``{node: (x, y)}``: inputs 0, 1 at x = 0, node ``j`` at
  x = 1.5 (j − 1) on a zig-zag, the output ``"out"`` past the last."""
  positions = {0: (0.0, 0.8), 1: (0.0, -0.8)}
  for j in range(2, num_nodes):
    positions[j] = (1.5 * (j - 1), 1.2 if j % 2 else -1.2)
  positions["out"] = (1.5 * (num_nodes - 1), 0.0)
  return positions


def draw_cell(ax, edges: Sequence[tuple[str, int]],
              concat: Sequence[int], title: str = "") -> None:
  """Draws one cell on the matplotlib axes ``ax``.

  Args:
    ax: the axes.
    edges: ``(op, input node)`` pairs, two per intermediate node, in node
      order (``genotype.normal`` or ``genotype.reduce``).
    concat: the nodes concatenated into the output.
    title: the axes' title.
  """
  num_nodes = 2 + len(edges) // 2
  pos = node_positions(num_nodes)
  names = {0: "c_{k-2}", 1: "c_{k-1}", "out": "c_{k}"}
  for k, (op, source) in enumerate(edges):
    _arrow(ax, pos[source], pos[2 + k // 2], op, k % 2)
  for node in concat:
    _arrow(ax, pos[node], pos["out"], "", 0, color="0.6")
  for node, (x, y) in pos.items():
    colour = "lightblue" if node in (0, 1, "out") else "khaki"
    name = names[node] if node in names else str(node - 2)
    ax.text(x, y, name, ha="center", va="center",
            bbox={"boxstyle": "round", "fc": colour, "ec": "0.3"},
            fontsize=9, zorder=3)
  ax.set_xlim(-0.7, 1.5 * (num_nodes - 1) + 0.7)
  ax.set_ylim(-1.7, 1.7)
  ax.set_title(title, fontsize=10)
  ax.axis("off")


def _arrow(ax, start, end, label, offset, color="0.2"):
  bend = 0.25 if offset else -0.25
  ax.annotate("", xy=end, xytext=start, arrowprops={
      "arrowstyle": "->", "color": color,
      "connectionstyle": f"arc3,rad={bend}", "shrinkA": 12, "shrinkB": 12})
  if label:
    middle = (np.asarray(start) + np.asarray(end)) / 2
    normal = np.asarray([start[1] - end[1], end[0] - start[0]])
    normal = normal / max(np.linalg.norm(normal), 1e-9)
    x, y = middle - 0.5 * bend * normal * np.linalg.norm(
        np.asarray(end) - np.asarray(start))
    ax.text(x, y, label, ha="center", va="center", fontsize=7,
            color="darkred", zorder=2)


def draw_genotype(genotype: Genotype, title: str = "", axes=None):
  """Both cells of ``genotype`` side by side; returns the figure.

  Args:
    genotype: the architecture.
    title: prefixed to each cell's title.
    axes: two matplotlib axes (default: a new 1 × 2 figure).
  """
  if axes is None:
    import matplotlib.pyplot as plt  # noqa: PLC0415 (optional dependency)
    _, axes = plt.subplots(1, 2, figsize=(14, 4))
  for ax, kind in zip(axes, ("normal", "reduce")):
    draw_cell(ax, getattr(genotype, kind), getattr(genotype, f"{kind}_concat"),
              f"{title} {kind} cell".strip())
  return axes[0].figure
