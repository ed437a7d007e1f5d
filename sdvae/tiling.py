"""Seam-free tiled encode/decode in bounded memory.

diffusers' tiled VAE runs each tile through the whole network and blends the overlaps, so every tile's GroupNorms
see different statistics: seams and colour shifts that no blending removes. Here the network runs layer by layer
instead. Each full-resolution activation is held as a grid of tiles, every convolution reads its tile plus a halo
from the neighbours, and every GroupNorm is applied with statistics accumulated over the WHOLE image while its input
was being written. The result equals the untiled forward pass up to float rounding.

Memory: a stage keeps only its input and output grids, frees input tiles after their last reader, and spills tiles
to a temporary file past `max_memory` bytes. The low-resolution middle block (with its global attention) runs
whole, as it does untiled: at 1/8 of the image size it is small.
"""
from __future__ import annotations

import math
import tempfile

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


class ChannelStats:
    """Running per-(sample, channel) count, mean and sum of squared deviations, merged tile by tile in float64
    (Chan et al.), so that any grouping of channels can be normalised afterwards."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def update(self, x: torch.Tensor):
        # fp32 sums are ~10x faster than var_mean here; the tile's mean is subtracted in float64 below, so the
        # cancellation is only within a tile, around its own mean
        x = x.float()
        n = x.shape[2] * x.shape[3]
        mean = x.sum((2, 3)).double() / n
        m2 = torch.linalg.vector_norm(x, 2, dim=(2, 3)).double().square() - n * mean.square()
        m2 = m2.clamp_min(0)
        if self.mean is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.n * n / total)
        self.n = total

    def group_norm(self, norm: torch.nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-(sample, channel) mean and 1/std of `norm`'s groups, as float32 (B, C, 1, 1)."""
        b, c = self.mean.shape
        g = norm.num_groups
        means = self.mean.view(b, g, c // g)
        group_mean = means.mean(-1, keepdim=True)
        m2 = self.m2.view(b, g, c // g).sum(-1, keepdim=True) + self.n * (means - group_mean).square().sum(-1, keepdim=True)
        var = m2 / (self.n * (c // g))
        rstd = (var + norm.eps).rsqrt()
        expand = lambda t: t.expand(b, g, c // g).reshape(b, c, 1, 1).float()
        return expand(group_mean), expand(rstd)


class TileGrid:
    """A (B, C, H, W) activation stored as a grid of tiles (each its own tensor, or a SpilledTile): freed one by one,
    spilled to disk past a budget."""

    def __init__(self, shape, tile: int, dtype, device, memory: "MemoryBudget", stats: bool = True):
        self.b, self.c, self.h, self.w = shape
        self.tile, self.dtype, self.device, self.memory = tile, dtype, device, memory
        # bands of the full width holding about tile x tile pixels: a consumed band is freed one band after
        # it is read, so a stage holds little more than one full-size activation at a time
        width = self.w if self.w * 8 <= tile * tile else tile
        height = max(8, tile * tile // width // 8 * 8)
        self.rows = [(y, min(y + height, self.h)) for y in range(0, self.h, height)]
        self.cols = [(x, min(x + width, self.w)) for x in range(0, self.w, width)]
        self.tiles: dict[tuple[int, int], torch.Tensor] = {}
        self.stats = ChannelStats() if stats else None

    @classmethod
    def from_tensor(cls, x: torch.Tensor, tile: int, memory) -> "TileGrid":
        grid = cls(x.shape, tile, x.dtype, x.device, memory)
        for index, (y0, y1, x0, x1) in grid.boxes():
            grid.put(index, x[..., y0:y1, x0:x1].clone())
        return grid

    def boxes(self):
        for i, (y0, y1) in enumerate(self.rows):
            for j, (x0, x1) in enumerate(self.cols):
                yield (i, j), (y0, y1, x0, x1)

    def put(self, index, tensor: torch.Tensor):
        if self.stats is not None:
            self.stats.update(tensor)
        self.tiles[index] = self.memory.store(tensor)

    def get(self, index) -> torch.Tensor:
        return self.memory.load(self.tiles[index]).to(self.device)

    def release(self, index):
        self.memory.release(self.tiles.pop(index))

    def covering(self, y0, y1, x0, x1) -> list[tuple[int, int]]:
        return [(i, j) for i, (r0, r1) in enumerate(self.rows) if r0 < y1 and r1 > y0
                for j, (c0, c1) in enumerate(self.cols) if c0 < x1 and c1 > x0]

    def read(self, y0, y1, x0, x1) -> torch.Tensor:
        """The region [y0, y1) x [x0, x1), which lies inside the image, gathered from the tiles it overlaps."""
        rows = []
        for i, (r0, r1) in enumerate(self.rows):
            if r0 >= y1 or r1 <= y0:
                continue
            parts = [self.get((i, j))[..., max(y0, r0) - r0: min(y1, r1) - r0, max(x0, c0) - c0: min(x1, c1) - c0]
                     for j, (c0, c1) in enumerate(self.cols) if c0 < x1 and c1 > x0]
            rows.append(torch.cat(parts, dim=3) if len(parts) > 1 else parts[0])
        return torch.cat(rows, dim=2) if len(rows) > 1 else rows[0]

    def read_into(self, out: torch.Tensor, y0: int, x0: int):
        """Copy the region of out's size at (y0, x0), which lies inside the image, into `out`."""
        y1, x1 = y0 + out.shape[2], x0 + out.shape[3]
        for i, j in self.covering(y0, y1, x0, x1):
            (r0, r1), (c0, c1) = self.rows[i], self.cols[j]
            a, b, c, d = max(y0, r0), min(y1, r1), max(x0, c0), min(x1, c1)
            out[..., a - y0: b - y0, c - x0: d - x0].copy_(self.get((i, j))[..., a - r0: b - r0, c - c0: d - c0])

    def to_tensor(self) -> torch.Tensor:
        return self.read(0, self.h, 0, self.w)

    def free(self):
        for index in list(self.tiles):
            self.release(index)


class SpilledTile:
    """A tile written to the budget's spill file (read back in full when used): its pages are the kernel's page
    cache, not the process's memory, so a decode larger than RAM still runs."""

    def __init__(self, offset: int, shape, dtype, device):
        self.offset, self.shape, self.dtype, self.device = offset, tuple(shape), dtype, device
        self.nbytes = math.prod(self.shape) * torch.tensor([], dtype=dtype).element_size()


class MemoryBudget:
    """Counts the bytes of live tiles; past `limit`, new tiles go to one temporary file (unlinked from the start,
    so nothing is left behind by a killed process), whose freed slots are reused by tiles of the same size."""

    def __init__(self, limit: int | None, progress=None):
        self.limit, self.used, self.peak, self.spilled = limit, 0, 0, 0
        self.progress = progress  # a tqdm bar advanced once per tile computed, or None
        self.file, self.end, self.free_slots, self._scratch = None, 0, {}, None

    def store(self, tensor: torch.Tensor):
        if self.progress is not None:
            self.progress.update(1)
        size = tensor.numel() * tensor.element_size()
        if self.limit is None or self.used + size <= self.limit:
            self.used += size
            self.peak = max(self.peak, self.used)
            return tensor
        self.spilled += size
        if self.file is None:
            self.file = tempfile.TemporaryFile(prefix="sdvae-tiles-")
        slots = self.free_slots.get(size)
        offset = slots.pop() if slots else self.end
        self.end = max(self.end, offset + size)
        self.file.seek(offset)
        self.file.write(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
        return SpilledTile(offset, tensor.shape, tensor.dtype, tensor.device)

    def load(self, tile):
        if not isinstance(tile, SpilledTile):
            return tile
        data = bytearray(tile.nbytes)
        self.file.seek(tile.offset)
        self.file.readinto(data)
        return torch.frombuffer(data, dtype=torch.uint8).view(tile.dtype).view(tile.shape).to(tile.device)

    def workspace(self, shape, dtype, device, channels_last: bool) -> torch.Tensor:
        """A scratch tensor of `shape`, reusing one buffer across calls (fresh allocations of this size cost page
        faults that are a real share of the time on CPU)."""
        numel = math.prod(shape)
        if self._scratch is None or self._scratch.numel() < numel or self._scratch.dtype != dtype \
                or self._scratch.device != torch.device(device):
            self._scratch = torch.empty(numel, dtype=dtype, device=device)
        flat = self._scratch[:numel]
        b, c, h, w = shape
        return flat.view(b, h, w, c).permute(0, 3, 1, 2) if channels_last else flat.view(shape)

    def release(self, tile):
        if isinstance(tile, SpilledTile):
            self.free_slots.setdefault(tile.nbytes, []).append(tile.offset)
        else:
            self.used -= tile.numel() * tile.element_size()

    def close(self):
        if self.progress is not None:
            self.progress.close()
        if self.file is not None:
            self.file.close()


def normalise(stats: ChannelStats, norm: torch.nn.GroupNorm, act):
    """In place: x -> act(GroupNorm(x)) with whole-image statistics."""
    mean, rstd = stats.group_norm(norm)
    scale = rstd * norm.weight.float().view(1, -1, 1, 1)
    shift = norm.bias.float().view(1, -1, 1, 1) - mean * scale

    def apply(x):
        torch.addcmul(shift.to(x.device, x.dtype), x, scale.to(x.device, x.dtype), out=x)
        if isinstance(act, torch.nn.SiLU):
            F.silu(x, inplace=True)
        else:
            x.copy_(act(x))
    return apply


def conv_region(src: TileGrid, conv: torch.nn.Conv2d, box, pre=None, upsample: bool = False) -> torch.Tensor:
    """conv(pre(src)) on the output box (y0, y1, x0, x1): the input window it needs is gathered into a reused
    buffer, `pre` applied in place, and zeros put where the window leaves the image (after `pre`, as in the
    whole-image forward). `upsample`: the input is src upsampled 2x (nearest) first, as in diffusers' Upsample2D."""
    (k, _), (s, _), (p, _) = conv.kernel_size, conv.stride, conv.padding
    scale = 2 if upsample else 1
    h, w = src.h * scale, src.w * scale
    y0, y1, x0, x1 = box
    iy0, iy1, ix0, ix1 = y0 * s - p, (y1 - 1) * s - p + k, x0 * s - p, (x1 - 1) * s - p + k
    cy0, cy1, cx0, cx1 = max(iy0, 0), min(iy1, h), max(ix0, 0), min(ix1, w)
    buf = src.memory.workspace((src.b, src.c, iy1 - iy0, ix1 - ix0), src.dtype, src.device,
                               conv.weight.is_contiguous(memory_format=torch.channels_last))
    top, left, bottom, right = cy0 - iy0, cx0 - ix0, cy1 - iy0, cx1 - ix0
    for strip in (buf[..., :top, :], buf[..., bottom:, :], buf[..., :, :left], buf[..., :, right:]):
        strip.zero_()
    inside = buf[..., top:bottom, left:right]
    if upsample:
        x = src.read(cy0 // 2, (cy1 - 1) // 2 + 1, cx0 // 2, (cx1 - 1) // 2 + 1)
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        inside.copy_(x[..., cy0 % 2: cy0 % 2 + cy1 - cy0, cx0 % 2: cx0 % 2 + cx1 - cx0])
    else:
        src.read_into(inside, cy0, cx0)
    if pre is not None:
        pre(inside)
    return F.conv2d(buf, conv.weight, conv.bias, stride=s)


def _input_window(conv, box, upsample: bool):
    (k, _), (s, _), (p, _) = conv.kernel_size, conv.stride, conv.padding
    y0, y1, x0, x1 = box
    window = [y0 * s - p, (y1 - 1) * s - p + k, x0 * s - p, (x1 - 1) * s - p + k]
    return [math.floor(v / 2) if i % 2 == 0 else math.floor((v - 1) / 2) + 1 for i, v in enumerate(window)] \
        if upsample else window


def conv_stage(src: TileGrid, conv, out_shape, pre=None, upsample=False, consume=True) -> TileGrid:
    """One convolution over the whole grid, tile by tile; input tiles are freed after their last reader."""
    out = TileGrid(out_shape, src.tile, src.dtype, src.device, src.memory)
    last_reader = {}
    boxes = list(out.boxes())
    for n, (_, box) in enumerate(boxes):
        for index in src.covering(*_input_window(conv, box, upsample)):
            last_reader[index] = n
    for n, (index, box) in enumerate(boxes):
        out.put(index, conv_region(src, conv, box, pre, upsample))
        if consume:
            for done in [i for i, last in last_reader.items() if last == n]:
                src.release(done)
    return out


def resnet_stage(block, x: TileGrid) -> TileGrid:
    """diffusers' ResnetBlock2D (no time embedding): out = (shortcut(x) + conv2(act(norm2(conv1(act(norm1(x)))))))
    / output_scale_factor, in two passes over the tiles, one per GroupNorm."""
    pre1 = normalise(x.stats, block.norm1, block.nonlinearity)
    h = TileGrid((x.b, block.conv1.out_channels, x.h, x.w), x.tile, x.dtype, x.device, x.memory)
    out = TileGrid((x.b, block.conv2.out_channels, x.h, x.w), x.tile, x.dtype, x.device, x.memory)
    shortcut = {}  # taken in the first pass, so that x's tiles can go before the second
    last_reader = {}
    boxes = list(h.boxes())
    for n, (_, box) in enumerate(boxes):
        for index in x.covering(*_input_window(block.conv1, box, False)):
            last_reader[index] = n
    for n, (index, box) in enumerate(boxes):
        h.put(index, conv_region(x, block.conv1, box, pre1))
        if block.conv_shortcut is not None:
            shortcut[index] = x.memory.store(block.conv_shortcut(x.get(index)))
        for done in [i for i, last in last_reader.items() if last == n]:
            if block.conv_shortcut is None:
                shortcut[done] = x.tiles.pop(done)  # the identity shortcut: the same bytes, now the output's
            else:
                x.release(done)
    pre2 = normalise(h.stats, block.norm2, block.nonlinearity)
    for index, box in out.boxes():
        stored = shortcut.pop(index)
        y = x.memory.load(stored).add_(conv_region(h, block.conv2, box, pre2))
        x.memory.release(stored)  # y, the same tensor where it was in memory, is counted again by put()
        if block.output_scale_factor != 1:
            y.div_(block.output_scale_factor)
        out.put(index, y)
    h.free()
    return out


def _run_resnet_blocks(blocks, x: TileGrid) -> TileGrid:
    for block in blocks:
        if block.time_emb_proj is not None or block.upsample is not None or block.downsample is not None:
            raise NotImplementedError("tiled mode supports VAE resnet blocks only (no time embedding or resampling)")
        x = resnet_stage(block, x)
    return x


def untiled_bytes(vae, direction: str, shape, dtype) -> int:
    """A rough peak of the untiled pass (measured 4.05 GB for a 1024x1024 SD decode in fp32: about four
    activations of the widest full-resolution layer)."""
    b, _, h, w = shape
    if direction == "decode":
        h, w = h * 8, w * 8
        channels = vae.decoder.up_blocks[-1].resnets[0].in_channels
    else:
        channels = vae.encoder.conv_in.out_channels
    return 4 * b * h * w * channels * torch.tensor([], dtype=dtype).element_size()


def default_budget(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * 0.6)
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
        return int(available * 0.6)
    except (OSError, StopIteration):
        return None


def _budget(max_memory, device, pixels: int, tile_size: int, name: str) -> MemoryBudget:
    # a progress bar (tiles/s) where the pass is long: more than ~16 full-resolution tiles
    bar = tqdm(desc=name, unit="tile", leave=False) if pixels > 16 * tile_size * tile_size else None
    return MemoryBudget(max_memory if max_memory is not None else default_budget(device), bar)


@torch.no_grad()
def tiled_decode(vae, z: torch.Tensor, tile_size: int = 256, max_memory: int | None = None) -> torch.Tensor:
    """vae.decode(z).sample, computed layer by layer over tiles of `tile_size` pixels (of each stage's own
    resolution) with whole-image GroupNorm statistics."""
    decoder = vae.decoder
    if decoder.conv_norm_out.__class__ is not torch.nn.GroupNorm:
        raise NotImplementedError("tiled decode supports GroupNorm decoders (not SpatialNorm)")
    memory = _budget(max_memory, z.device, z.shape[-2] * z.shape[-1] * 64, tile_size, "tiled decode")
    try:
        if vae.post_quant_conv is not None:
            z = vae.post_quant_conv(z)
        x = decoder.mid_block(decoder.conv_in(z))
        x = x.to(next(iter(decoder.up_blocks.parameters())).dtype)
        grid = TileGrid.from_tensor(x, tile_size, memory)
        del x
        for block in decoder.up_blocks:
            grid = _run_resnet_blocks(block.resnets, grid)
            for up in block.upsamplers or []:
                if up.use_conv_transpose or up.norm is not None or not up.use_conv:
                    raise NotImplementedError("tiled decode supports nearest-upsample + conv upsamplers")
                grid = conv_stage(grid, up.conv, (grid.b, up.conv.out_channels, grid.h * 2, grid.w * 2), upsample=True)
        pre = normalise(grid.stats, decoder.conv_norm_out, decoder.conv_act)
        out = torch.empty(grid.b, decoder.conv_out.out_channels, grid.h, grid.w, dtype=grid.dtype, device=grid.device)
        for index, (y0, y1, x0, x1) in list(grid.boxes()):
            out[..., y0:y1, x0:x1] = conv_region(grid, decoder.conv_out, (y0, y1, x0, x1), pre)
        grid.free()
        return out
    finally:
        memory.close()


@torch.no_grad()
def tiled_encode(vae, x: torch.Tensor, tile_size: int = 256, max_memory: int | None = None) -> torch.Tensor:
    """The posterior's moments (B, 2C, H/8, W/8), as vae.encode computes them, layer by layer over tiles."""
    encoder = vae.encoder
    memory = _budget(max_memory, x.device, x.shape[-2] * x.shape[-1], tile_size, "tiled encode")
    try:
        grid = TileGrid(x.shape, tile_size, x.dtype, x.device, memory, stats=False)
        for index, (y0, y1, x0, x1) in grid.boxes():
            grid.put(index, x[..., y0:y1, x0:x1])
        grid = conv_stage(grid, encoder.conv_in, (x.shape[0], encoder.conv_in.out_channels, x.shape[2], x.shape[3]))
        for block in encoder.down_blocks:
            grid = _run_resnet_blocks(block.resnets, grid)
            for down in block.downsamplers or []:
                if not down.use_conv or down.norm is not None:
                    raise NotImplementedError("tiled encode supports strided-conv downsamplers")
                conv = down.conv
                shape = (grid.b, conv.out_channels, (grid.h + 2 * conv.padding[0] - 3 + (conv.padding[0] == 0)) // 2 + 1,
                         (grid.w + 2 * conv.padding[0] - 3 + (conv.padding[0] == 0)) // 2 + 1)
                grid = conv_stage(grid, conv, shape)
        h = grid.to_tensor()
        grid.free()
        h = encoder.conv_out(encoder.conv_act(encoder.conv_norm_out(encoder.mid_block(h))))
        return vae.quant_conv(h) if vae.quant_conv is not None else h
    finally:
        memory.close()
