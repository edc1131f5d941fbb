"""CycleGAN's ResNet generator written the way junyanz/pytorch-CycleGAN-and-pix2pix writes it (models/networks.py;
Zhu et al. 2017, after Johnson et al.'s fast style transfer).

A reflection-padded 7x7 stem, two stride-2 convolutions down, ``n_blocks`` residual blocks (reflection pad, 3x3
conv, norm, ReLU, twice; ``x + conv_block(x)``), two ``nn.ConvTranspose2d`` (``output_padding=1``) up and a
reflection-padded 7x7 convolution into ``nn.Tanh``. The norm layer is passed as a ``functools.partial``, and the
convolutions have a bias only with instance norm, as there: CycleGAN's default is
``nn.InstanceNorm2d(affine=False, track_running_stats=False)``, pix2pix's ``nn.BatchNorm2d``. Left out: the
other generators (U-Net), the discriminators, weight init.
"""

import functools

import torch.nn as nn

__all__ = ["ResnetBlock", "ResnetGenerator", "get_norm_layer"]


def get_norm_layer(norm_type="instance"):
    """The norm layer as networks.py names it: "batch" (pix2pix) or "instance" (CycleGAN)."""
    if norm_type == "batch":
        return functools.partial(nn.BatchNorm2d, affine=True, track_running_stats=True)
    if norm_type == "instance":
        return functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    raise NotImplementedError(f"normalization layer [{norm_type}] is not found")


class ResnetBlock(nn.Module):
    """Two padded 3x3 convolutions with a skip connection."""

    def __init__(self, dim, padding_type, norm_layer, use_dropout, use_bias):
        super().__init__()
        self.conv_block = self.build_conv_block(dim, padding_type, norm_layer, use_dropout, use_bias)

    def build_conv_block(self, dim, padding_type, norm_layer, use_dropout, use_bias):
        conv_block = []
        for second in (False, True):
            p = 0
            if padding_type == "reflect":
                conv_block += [nn.ReflectionPad2d(1)]
            elif padding_type == "replicate":
                conv_block += [nn.ReplicationPad2d(1)]
            elif padding_type == "zero":
                p = 1
            else:
                raise NotImplementedError(f"padding [{padding_type}] is not implemented")
            conv_block += [nn.Conv2d(dim, dim, kernel_size=3, padding=p, bias=use_bias), norm_layer(dim)]
            if not second:
                conv_block += [nn.ReLU(True)]
                if use_dropout:
                    conv_block += [nn.Dropout(0.5)]
        return nn.Sequential(*conv_block)

    def forward(self, x):
        out = x + self.conv_block(x)  # add skip connections
        return out


class ResnetGenerator(nn.Module):
    """Downsampling, ``n_blocks`` ResnetBlocks, upsampling with transposed convolutions."""

    def __init__(self, input_nc, output_nc, ngf=64, norm_layer=nn.BatchNorm2d, use_dropout=False, n_blocks=6,
                 padding_type="reflect"):
        assert n_blocks >= 0
        super().__init__()
        if type(norm_layer) is functools.partial:
            use_bias = norm_layer.func == nn.InstanceNorm2d
        else:
            use_bias = norm_layer == nn.InstanceNorm2d

        model = [nn.ReflectionPad2d(3),
                 nn.Conv2d(input_nc, ngf, kernel_size=7, padding=0, bias=use_bias),
                 norm_layer(ngf),
                 nn.ReLU(True)]

        n_downsampling = 2
        for i in range(n_downsampling):  # add downsampling layers
            mult = 2 ** i
            model += [nn.Conv2d(ngf * mult, ngf * mult * 2, kernel_size=3, stride=2, padding=1, bias=use_bias),
                      norm_layer(ngf * mult * 2),
                      nn.ReLU(True)]

        mult = 2 ** n_downsampling
        for i in range(n_blocks):  # add ResNet blocks
            model += [ResnetBlock(ngf * mult, padding_type=padding_type, norm_layer=norm_layer,
                                  use_dropout=use_dropout, use_bias=use_bias)]

        for i in range(n_downsampling):  # add upsampling layers
            mult = 2 ** (n_downsampling - i)
            model += [nn.ConvTranspose2d(ngf * mult, int(ngf * mult / 2), kernel_size=3, stride=2, padding=1,
                                         output_padding=1, bias=use_bias),
                      norm_layer(int(ngf * mult / 2)),
                      nn.ReLU(True)]
        model += [nn.ReflectionPad2d(3)]
        model += [nn.Conv2d(ngf, output_nc, kernel_size=7, padding=0)]
        model += [nn.Tanh()]

        self.model = nn.Sequential(*model)

    def forward(self, input):
        return self.model(input)
