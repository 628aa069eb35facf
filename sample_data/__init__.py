"""histo_sample: synthetic H&E whole-slide images with ground truth (lymph node, synovium).

``make_scene`` lays out a slide in µm, ``render_region`` paints any region of any pyramid level,
``write_sample`` writes a pyramidal OME-TIFF plus truth tables, ``write_training_set`` cuts
image/mask tiles for training a StarDist model, ``marker_cells`` gives a scene's nuclei as a
multiplex immunofluorescence cells table (marker means per nucleus, no image).
"""

from .markers import marker_cells
from .render import render_region
from .scene import Scene, make_scene

__all__ = ["Scene", "make_scene", "marker_cells", "render_region", "write_sample", "write_training_set"]


def __getattr__(name):
    if name == "write_sample":
        from .write import write_sample

        return write_sample
    if name == "write_training_set":
        from .training import write_training_set

        return write_training_set
    raise AttributeError(name)
