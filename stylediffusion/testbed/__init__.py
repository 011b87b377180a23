"""A small synthetic text-to-image world with exact ground truth.

``world`` generates captioned scenes (shapes of known colour on known
backgrounds) together with exact object masks; ``analyser`` reads colours and
shapes back from pixels; ``train`` trains a tiny Stable-Diffusion-shaped model on
the world; ``evaluate`` measures what that model learnt.  See ``docs/testbed.md``.
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
