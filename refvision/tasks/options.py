"""What each init option of a task is to the command: its :class:`Role`, declared on the option itself.

A task annotates every ``__init__`` argument with its role::

    backbone: Annotated[str, Role.ARCHITECTURE] = "mobilenet_v2",

and :func:`option_roles` reads the annotations, following ``**kwargs`` up to the base class's options.
The command (``refvision.app.lightning_cli``: links, ``--ckpt_path`` checks, help), the checkpoint
checks and the deploy form read the roles; no list of option names is kept outside the task.
"""

import enum
import inspect
import typing


class Role(enum.Enum):
    """The role of a task option; ``meaning`` says what the command does with an option of that role."""

    ARCHITECTURE = (
        "architecture",
        "what the network is: a --ckpt_path checkpoint's value stands, and a config value that contradicts it "
        "is refused",
    )
    RUN = (
        "run",
        "how test / validate / predict run the network: there the config's value replaces the --ckpt_path checkpoint's",
    )
    TRAINING = (
        "training",
        "not used by test / validate / predict (training settings, the profiling input): there a value that "
        "differs from the --ckpt_path checkpoint's is not refused",
    )
    DATA = (
        "data",
        "what the data is: set from the data module's attribute of the same name, and a given value that "
        "differs from the data's is refused",
    )
    DATA_ARGUMENT = (
        "data argument",
        "the data module's init argument of the same name, taken when the command line is parsed (the input "
        "size); never compared with a checkpoint's",
    )
    WEIGHTS = (
        "weights",
        "weights loaded or downloaded when the model is built: cleared in saved checkpoints (their own weights "
        "replace them), never compared",
    )

    def __init__(self, label: str, meaning: str) -> None:
        self.label = label
        self.meaning = meaning

    def __repr__(self) -> str:
        # How the help shows an option's type: Annotated[str, Role.ARCHITECTURE].
        return f"Role.{self.name}"


def option_roles(cls: type) -> dict[str, Role]:
    """The declared role of every init argument of ``cls``, the base classes' arguments first.

    The ``__init__`` of ``cls`` and of each base class it passes ``**kwargs`` on to are read, down to
    the first one without ``**kwargs``. An argument redeclared by a subclass takes the subclass's role.

    Raises:
        TypeError: an argument whose annotation declares no role or several (the message names it).
    """
    chain = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        chain.append(klass)
        if not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(klass.__init__).parameters.values()):
            break
    roles: dict[str, Role] = {}
    for klass in reversed(chain):
        hints = typing.get_type_hints(klass.__init__, include_extras=True)
        for parameter in list(inspect.signature(klass.__init__).parameters.values())[1:]:
            if parameter.kind not in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY):
                continue
            declared = [m for m in getattr(hints.get(parameter.name), "__metadata__", ()) if isinstance(m, Role)]
            if len(declared) != 1:
                raise TypeError(
                    f"{klass.__module__}.{klass.__qualname__}: init argument {parameter.name!r} declares "
                    f"{len(declared)} roles; expected one, as {parameter.name}: Annotated[<type>, Role.<role>] "
                    f"with <role> one of {', '.join(role.name for role in Role)}"
                )
            roles[parameter.name] = declared[0]
    return roles
