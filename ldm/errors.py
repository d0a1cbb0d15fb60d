"""Exceptions for mistakes a user can make (bad paths, bad configs, bad checkpoints).

Scripts catch :class:`LdmError` and print its message as a one-line error (exit code 2);
anything else is a bug and keeps its traceback.
"""


class LdmError(Exception):
    """Base class of the errors that are the user's to fix."""


class ConfigError(LdmError, ValueError):
    """A config file or value is invalid (unknown key, wrong type, unsupported option)."""


class CheckpointError(LdmError):
    """A weights file or model folder is missing, corrupt, unsafe or of the wrong architecture."""


class ImageInputError(LdmError, ValueError):
    """An init image, mask or strength the pipeline cannot use (unreadable, empty mask, strength out of range)."""


class ArgumentError(LdmError, ValueError):
    """An argument of a public function has the wrong type or value (not a finite number, out of range)."""


class DeviceError(LdmError, ValueError):
    """A device name torch does not know, or a device this machine does not have (``cuda`` without a GPU)."""


class OutputError(LdmError):
    """An output folder or file that cannot be written (a file in the way, no permission, disk full)."""
