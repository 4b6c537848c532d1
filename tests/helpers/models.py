"""Models for tests."""
import torch


def randomise_batch_norm(model: torch.nn.Module, mean: float = 0.1, var: tuple[float, float] = (0.5, 1.5),
                         weight: bool = False, seed: int = 1) -> torch.nn.Module:
    """Non-trivial BatchNorm running statistics (uniform in [-mean, mean] and ``var``; with ``weight``
    the affine weight and bias too, uniform in [0.5, 1.5] and [-mean, mean]), so a wrong
    normalisation, crop, fold or a load that skipped or misplaced them changes the answer. Returns ``model``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_((torch.rand(n, generator=generator) * 2 - 1) * mean)
                module.running_var.copy_(torch.rand(n, generator=generator) * (var[1] - var[0]) + var[0])
                if weight and module.affine:
                    module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                    module.bias.copy_((torch.rand(n, generator=generator) * 2 - 1) * mean)
    return model


def load_file_into(model: torch.nn.Module, path, family: str | None = None, key: str | None = None) -> None:
    """Read a weights file (``checkpoints.contents.read_weights``; ``key``: its entry holding the
    weights) and load it strictly into ``model``, as ``--pretrained-from-file`` does."""
    from image_classification.checkpoints.contents import read_weights
    from image_classification.models import weights
    weights.load_state_dict_into(model, read_weights(path, key=key).state_dict, source=str(path), family=family)
