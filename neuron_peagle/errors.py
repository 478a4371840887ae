"""Every error the library raises on bad input, so callers can catch them by kind.

Each message names the thing that is wrong (the file, the tensor, the prompt, the limit) and,
where there is one, what to do about it.
"""


class NeuronPeagleError(Exception):
    """Base class of the library's own errors."""

    # The message names fields as the user wrote them (a prompts file's JSON keys): the command line
    # must not rewrite them as its options.
    names_as_written = False


class ModelDirError(NeuronPeagleError):
    """A model or drafter directory is missing, or lacks a file it must have."""


class UnsupportedModelError(NeuronPeagleError):
    """The config describes an architecture or a feature this library does not implement."""


class WeightsError(NeuronPeagleError):
    """A weight file is unreadable, or a tensor is missing, unexpected or of the wrong shape."""


class ConfigError(NeuronPeagleError, ValueError):
    """A build or sampling setting is out of range or inconsistent with another."""


class PromptError(NeuronPeagleError, ValueError):
    """A prompt cannot be served: empty, longer than the largest bucket, or with no room to generate."""


class PromptLineError(PromptError):
    """A prompts file's line asks for a setting that cannot be (its field named as the file names it)."""

    names_as_written = True


class DrafterMismatchError(NeuronPeagleError):
    """A drafter does not fit its target (hidden size, vocabulary, feature layers)."""


class BackendUnavailableError(NeuronPeagleError):
    """The requested backend needs software that is not installed here."""


class ArtifactError(NeuronPeagleError):
    """Compiled artifacts cannot be built or used: a failed HLO audit, or a manifest that does not
    match the installed versions, the weights on disk or the requested shapes."""


class UsageError(ConfigError):
    """A command-line option is malformed: not a number, not one of its choices, missing its value."""
