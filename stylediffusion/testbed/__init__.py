"""A small synthetic text-to-image world with exact ground truth.

``world`` generates captioned scenes (shapes of known colour on known
backgrounds) together with exact object masks; ``analyser`` reads colours and
shapes back from pixels; ``model`` is the architecture of the tiny
Stable-Diffusion-shaped model whose trained weights ship in ``assets/testbed_model``
(``--model testbed``).  Training and measuring that model is not part of the
package: ``benchmarks/testbed_training/`` in the repository.  See ``docs/testbed.md``.
"""

from .world import (  # noqa: F401
    BACKGROUNDS,
    HELDOUT_COMBOS,
    OBJECT_COLOURS,
    SHAPES,
    SIZES,
    Background,
    Scene,
    SceneEdit,
    SceneObject,
    edit,
    make_scene,
    sample_batch,
    sample_scene,
)
