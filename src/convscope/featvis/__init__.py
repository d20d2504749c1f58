"""Feature visualisation by optimisation: the images a channel, a unit or a class responds
to most (Olah, Mordvintsev & Schubert, "Feature Visualization", Distill 2017), for any
CNN convscope can load, many objectives at once.

``visualize(model, ["_blocks.15:0-15", "class:Egyptian cat"])`` returns a
:class:`Visualization`; :func:`channel_summary` gathers everything the channel page of the
explorer, the atlas and the report shows about one channel; :func:`visualize_atlas` adds
visualisations to an atlas's channel pages (``convscope atlas ... --visualize``).
"""

from __future__ import annotations

from .atlas import visualize_atlas
from .channel import ChannelSummary, channel_summary
from .objectives import (
    Channel,
    ClassLogit,
    Direction,
    Diversity,
    Neuron,
    NoSpatialReadingError,
    Objective,
    ObjectiveError,
    OptimizationError,
    Sum,
    channel,
    class_logit,
    direction,
    diversity,
    neuron,
    parse_objective,
)
from .param import PARAMS
from .render import Visualization, read_maps, visualize
from .transforms import TRANSFORMS, RandomView

__all__ = [
    "PARAMS", "TRANSFORMS", "Channel", "ChannelSummary", "ClassLogit", "Direction",
    "Diversity", "Neuron", "NoSpatialReadingError", "Objective", "ObjectiveError",
    "OptimizationError", "RandomView", "Sum", "Visualization", "channel", "channel_summary",
    "class_logit", "direction", "diversity", "neuron", "parse_objective", "read_maps",
    "visualize", "visualize_atlas",
]
