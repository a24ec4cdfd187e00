"""Two-stream vision-language model in METER's layout: a vision tower and a text tower (any
supported Hugging Face encoders), their outputs projected to one width and tagged by modality,
then co-attention fusion layers. Each fusion layer runs, per stream: self-attention,
cross-attention to the other stream, MLP (pre-norm). Both streams' cross-attentions read the
other stream after its self-attention, so the two run side by side. Heads read the text stream's
mean and the image stream's [CLS] (or, with `image_pooling="text_query"`, the image tokens read by
attention from that text mean; with "two_hop", read twice, once per object the question names),
each through a tanh pooler.

A fusion layer's forward is `attend` then `feed_forward`, so a reduced forward
(models/families/two_stream.py) can remove tokens between them with the same modules.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from models.two_stream.configuration import TwoStreamConfig

TEXT, IMAGE = 0, 1  # modality embedding rows


def padding_bias(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, T) 1/0 mask -> additive key bias (B, 1, 1, T), or None when nothing is padding."""
    if attention_mask is None:
        return None
    blocked = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    blocked = blocked.masked_fill(attention_mask == 0, torch.finfo(dtype).min)
    return blocked[:, None, None, :]


class Attention(nn.Module):
    """Multi-head attention whose queries come from one sequence and keys/values from another
    (the same one for self-attention)."""

    def __init__(self, config: TwoStreamConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))

    @property
    def scale(self) -> float:
        return (self.q_proj.out_features // self.num_heads) ** -0.5

    def heads(self, proj: nn.Linear, h: torch.Tensor) -> torch.Tensor:
        b, n, _ = h.shape
        return proj(h).view(b, n, self.num_heads, -1).transpose(1, 2)

    def project(self, query: torch.Tensor, context: torch.Tensor):
        """(q, k, v), each (B, heads, N, head_dim)."""
        return (
            self.heads(self.q_proj, query),
            self.heads(self.k_proj, context),
            self.heads(self.v_proj, context),
        )

    def output(self, q, k, v, bias: torch.Tensor | None) -> torch.Tensor:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        b, _, n, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))

    def forward(self, query, context, bias=None) -> torch.Tensor:
        return self.output(*self.project(query, context), bias)


class TextQueryPool(nn.Module):
    """The image stream read by the question: the pooled text queries the image tokens by multi-head
    attention, a merged token weighing as many as the patches it stands for (log-size bias, as in
    ToMe's proportional attention)."""

    def __init__(self, config: TwoStreamConfig):
        super().__init__()
        self.attn = Attention(config)

    def forward(
        self,
        text: torch.Tensor,
        image: torch.Tensor,
        image_size: torch.Tensor | None,
        bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """text (B, D), image (B, N, D) -> (what it read (B, D), head-averaged attention (B, N)).
        bias: added to the attention logits, (B, heads, 1, N)."""
        attn = self.attn
        q, k, v = attn.project(text.unsqueeze(1), image)
        logits = (q @ k.transpose(-1, -2)) * attn.scale
        if bias is not None:
            logits = logits + bias
        if image_size is not None:
            logits = logits + image_size.to(logits.dtype).clamp_min(1e-6).log()[:, None, None, :]
        probs = logits.softmax(dim=-1)
        b, heads, _, head_dim = q.shape
        read = attn.o_proj((probs @ v).reshape(b, heads * head_dim))
        return read, probs.mean(dim=1)[:, 0]


class TwoHopPool(nn.Module):
    """The image stream read twice, for questions about two objects ("is the red circle left of the
    blue star?", "what color is the object nearest to the blue star?"). The mean-pooled question
    barely tells that question from its swap (cosine 0.993 in MiniLM), so each hop's query adds a
    phrase of the question pooled by its own learned token scores; the second hop's query also sees
    what the first read. Each read is a TextQueryPool. Training grounds the first read on the
    object the question names first and the second on the other (models/demo/two_stream.py)."""

    phrase_count = 2  # one per read

    def __init__(self, config: TwoStreamConfig):
        super().__init__()
        d = config.hidden_size
        self.phrase_scores = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, self.phrase_count))
        self.first_query = nn.Sequential(nn.Linear(2 * d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.second_query = nn.Sequential(nn.Linear(3 * d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.first, self.second = TextQueryPool(config), TextQueryPool(config)

    def phrases(self, tokens: torch.Tensor, text_weight: torch.Tensor | None) -> torch.Tensor:
        """(B, T, D) text tokens -> (B, phrase_count, D), each a softmax-weighted sum; a merged
        token counts as many as the tokens it stands for, padding (weight 0) not at all."""
        scores = self.phrase_scores(tokens)
        if text_weight is not None:
            w = text_weight.to(scores.dtype)[..., None]
            scores = (scores + w.clamp_min(1e-6).log()).masked_fill(w == 0, torch.finfo(scores.dtype).min)
        return scores.softmax(dim=1).transpose(1, 2) @ tokens

    def forward(
        self,
        tokens: torch.Tensor,
        text_weight: torch.Tensor | None,
        text: torch.Tensor,
        image: torch.Tensor,
        image_size: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, T, D), text (B, D) their pooled mean, image (B, N, D) -> (the two reads
        (B, 2, D), their head-averaged attentions (B, 2, N))."""
        phrases = self.phrases(tokens, text_weight)
        query = text + self.first_query(torch.cat([text, phrases[:, 0]], -1))
        first, look_first = self.first(query, image, image_size)
        query = text + self.second_query(torch.cat([text, phrases[:, 1], first], -1))
        bias = self.second_bias(query, image, image_size, look_first)
        second, look_second = self.second(query, image, image_size, bias)
        looks = torch.stack([look_first, look_second], 1)
        return self.summaries(torch.stack([first, second], 1), looks, image, phrases), looks

    def second_bias(
        self,
        query: torch.Tensor,
        image: torch.Tensor,
        image_size: torch.Tensor | None,
        look_first: torch.Tensor,
    ) -> torch.Tensor | None:
        """What the second read's attention logits add, (B, heads, 1, N): nothing here."""
        return None

    def summaries(
        self, reads: torch.Tensor, looks: torch.Tensor, image: torch.Tensor, phrases: torch.Tensor
    ) -> torch.Tensor:
        """What the heads get of the two reads (B, 2, D), their looks (B, 2, N) and the question's
        phrases (B, phrase_count, D): the reads."""
        return reads


class PlacedTwoHopPool(TwoHopPool):
    """TwoHopPool whose reads know where they looked ("two_hop_placed"). The reads find the right
    objects, yet a head on them answered "left of" and "above" at chance: the positions the
    tower's tokens carry do not survive into the reads in a form the head uses, while the
    attention centroids of the two reads answer 89 % of relation questions, and the pooled text
    tells "left of" from "right of", "above" and "below" only 69 % of the time (linear probes,
    docs/demo-models.md). So `where` decodes each image token's position, (x, y) in [-1, 1]
    (trained on the patch centres; linear, so a merged token, the size-weighted mean of its
    patches, maps to their centroid), and:
    - the heads get a third summary, the offset between the two reads' positions mapped by a
      matrix that a third phrase of the question sets (`relate`: the phrase "left of" turns the
      offset into "yes" one way, "below" another);
    - the second read's attention logits add, per head, a learned multiple of each token's
      distance in patches from where the first read looked and of the log of the first read's
      attention ("the object nearest to the blue star": near it, but not it)."""

    phrase_count = 3  # one per read, and how the two relate

    def __init__(self, config: TwoStreamConfig):
        super().__init__(config)
        d, self.heads = config.hidden_size, config.num_attention_heads
        self.where = nn.Linear(d, 2)
        self.near = nn.Linear(d, 2 * self.heads)
        self.relate = nn.Linear(d, 2 * d)
        self.half_grid = config.image_size / config.patch_size / 2  # [-1, 1] units -> patches

    def second_bias(self, query, image, image_size, look_first):
        where = self.where(image)
        first_at = look_first.unsqueeze(1) @ where  # (B, 1, 2)
        distance = ((where - first_at).pow(2).sum(-1) + 1e-6).sqrt() * self.half_grid  # (B, N)
        coef = self.near(query).view(-1, self.heads, 2, 1)
        per_patch = look_first if image_size is None else look_first / image_size.to(look_first.dtype)
        own = per_patch.clamp_min(1e-6).log()  # per patch, so a merged token counts as its patches
        return (coef[:, :, 1] * own.unsqueeze(1) - coef[:, :, 0] * distance.unsqueeze(1)).unsqueeze(2)

    def summaries(self, reads, looks, image, phrases):
        at = looks @ self.where(image)  # (B, 2, 2)
        b, d = phrases.shape[0], phrases.shape[-1]
        related = self.relate(phrases[:, 2]).view(b, d, 2) @ (at[:, 0] - at[:, 1]).unsqueeze(-1)
        return torch.cat([reads, related.transpose(1, 2)], dim=1)


def counted(
    density: torch.Tensor, attributes: Sequence[torch.Tensor], accept: Sequence[torch.Tensor]
) -> torch.Tensor:
    """How many objects a question counts: density (B, N) of object centres per token, attributes
    the tokens' logits over each attribute's values ((B, N, values) each), accept the question's
    probability of counting each value ((B, values) each) -> (B,), the sum over tokens of the
    density times the probability that the object centred there is counted."""
    kept = density
    for logits, ok in zip(attributes, accept, strict=True):
        kept = kept * (logits.softmax(-1) @ ok.unsqueeze(-1)).squeeze(-1)
    return kept.sum(dim=1)


def token_mlp(width: int, hidden: int, out: int, eps: float) -> nn.Sequential:
    """What the object paths run on each vision tower token: a norm, then three layers."""
    return nn.Sequential(
        nn.LayerNorm(width, eps=eps),
        nn.Linear(width, hidden),
        nn.GELU(),
        nn.Linear(hidden, hidden),
        nn.GELU(),
        nn.Linear(hidden, out),
    )


class ObjectCount(nn.Module):
    """The count path (config.count_attributes): "how many red circles are there?" answered by
    detection, beside the fusion layers, from the two towers' outputs. `detect` maps each vision
    tower token to a density of object centres (softplus; trained on the scene graphs so a
    scene's map sums to its object count: models/demo/two_stream.count_loss) and to the
    attributes of the object centred there; the text tower's pooled question sets which values of
    each attribute it counts (`accept`, sigmoids); the count is `counted`. It reaches the answer
    as a score per number answer n, -scale (n - count)^2, the scale set by the question (zero at
    growth: models/demo/two_stream.with_counting). A merged token's density is read from its mean
    feature, not multiplied by its size: merging joins the patches of one object more often than
    two objects. Heads reading attention summaries counted 55-62 % of the scenes set's counting
    questions, a detector on the fused image stream no better (docs/demo-models.md)."""

    def __init__(self, config: TwoStreamConfig):
        super().__init__()
        d, self.groups = config.hidden_size, list(config.count_attributes)
        vision, text = config.vision_config.hidden_size, config.text_config.hidden_size
        self.detect = token_mlp(vision, d, 1 + sum(self.groups), config.layer_norm_eps)
        self.accept = nn.Sequential(nn.Linear(text, d), nn.GELU(), nn.Linear(d, sum(self.groups)))
        self.scale = nn.Linear(text, 1)
        self.numbers = len(config.count_labels)

    def detections(self, tower: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(B, N, vision width) tower tokens -> (density (B, N), per attribute its logits
        (B, N, values))."""
        out = self.detect(tower)
        return F.softplus(out[..., 0]), out[..., 1:].split(self.groups, dim=-1)

    def accepts(self, question: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, text width) the text tower's pooled question -> per attribute the probability it
        counts each value, (B, values)."""
        return torch.sigmoid(self.accept(question)).split(self.groups, dim=-1)

    def scores(self, question: torch.Tensor, density: torch.Tensor, attributes) -> torch.Tensor:
        """The number answers' scores (B, len(count_labels)) from `detections`' output:
        -scale (n - count)^2, count the `counted` objects."""
        count = counted(density, attributes, self.accepts(question))
        numbers = torch.arange(self.numbers, device=count.device, dtype=count.dtype)
        return -self.scale(question) * (numbers - count.unsqueeze(-1)).pow(2)

    def forward(self, question: torch.Tensor, tower: torch.Tensor) -> torch.Tensor:
        """question (B, text width) the text tower's pooled output, tower (B, N, vision width) the
        vision tower's tokens, [CLS] first -> the number answers' scores (B, len(count_labels))."""
        return self.scores(question, *self.detections(tower[:, 1:]))


# read_objects' constants, in units of half the image side (a 16 x 16 grid's cell is 0.125): a
# token within about EXCLUSION of the described object's centre is taken for part of it; the
# object nearest to it is picked by a softmax over -distance / NEAREST_TEMPERATURE, among tokens
# holding more than DENSITY_FLOOR of an object centre. Set on the scenes set's validation
# "nearest" questions with the question's description read off its words (docs/demo-models.md).
EXCLUSION = 0.25
NEAREST_TEMPERATURE = 0.094
DENSITY_FLOOR = 0.1


def read_objects(
    density: torch.Tensor,
    attributes: Sequence[torch.Tensor],
    described: torch.Tensor,
    where: torch.Tensor,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The attributes of the object a question describes and of the object nearest to it.
    density (B, N): object centres per token; attributes: per attribute the tokens' probabilities
    over its values ((B, N, values) each); described (B, N): the probability that the object
    centred at each token is the one described; where (B, N, 2): each token's position (units:
    half the image side). -> (per attribute the described object's value probabilities (B,
    values), the same for the nearest other object). Each is a density-weighted mean over tokens:
    the described object's over its own, the nearest's over the others', weighted by a softmax of
    their distance from the described object's centre. Computed in float32: the tokens without an
    object must stay below a far object (the floor's log, -46, is farther than the image is wide)."""
    dtype = density.dtype
    density, described, where = density.float(), described.float(), where.float()
    attributes = [p.float() for p in attributes]
    held = density * described
    total = held.sum(dim=1, keepdim=True).clamp_min(1e-6)
    at = (held.unsqueeze(-1) * where).sum(dim=1) / total  # (B, 2)
    distance = ((where - at.unsqueeze(1)).pow(2).sum(-1) + 1e-12).sqrt()
    away = 1 - torch.exp(-(distance / EXCLUSION).pow(2))
    others = (density * (1 - described) * away - DENSITY_FLOOR).clamp_min(1e-20)
    pick = torch.softmax(others.log() - distance / NEAREST_TEMPERATURE, dim=1)
    own = [((held.unsqueeze(-1) * p).sum(dim=1) / total).to(dtype) for p in attributes]
    nearest = [(pick.unsqueeze(-1) * p).sum(dim=1).to(dtype) for p in attributes]
    return own, nearest


class ObjectRead(nn.Module):
    """The read path (config.read_labels), beside the count path, on its detections: "what color
    is the star?" and "what shape is the object nearest to the red circle?". `refer` reads from
    the pooled question which values each attribute of the object it describes takes (sigmoids,
    as the count path's `accept`), `locate` each vision tower token's position (from its feature,
    so pruned and merged tokens get one without every method carrying positions), and
    read_objects the value probabilities of the described object and of the one nearest to it;
    `weigh` sets from the question how much each (object, attribute) pair adds, as its weight
    times the log-probability, to the answer of each value (zero at growth:
    models/demo/two_stream.with_reading). The two fusion reads found the nearest object in under
    half of the validation "nearest" questions (docs/demo-models.md)."""

    def __init__(self, config: TwoStreamConfig):
        super().__init__()
        d, self.groups = config.hidden_size, list(config.count_attributes)
        vision, text = config.vision_config.hidden_size, config.text_config.hidden_size
        self.refer = nn.Sequential(nn.Linear(text, d), nn.GELU(), nn.Linear(d, sum(self.groups)))
        self.locate = token_mlp(vision, d, 2, config.layer_norm_eps)
        self.weigh = nn.Linear(text, 2 * len(self.groups))

    def refers(self, question: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, text width) -> per attribute the probability that the described object has each
        value, (B, values)."""
        return torch.sigmoid(self.refer(question)).split(self.groups, dim=-1)

    def reads(self, question, tokens, density, attributes) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """question (B, text width) the pooled question, tokens (B, N, vision width) the vision
        tower's ([CLS] left out), density and attributes (logits) the count path's detections of
        them -> read_objects' output: the described and the nearest object's value probabilities."""
        probs = [logits.softmax(-1) for logits in attributes]
        described = torch.ones_like(density)
        for p, refer in zip(probs, self.refers(question), strict=True):
            described = described * (p @ refer.unsqueeze(-1)).squeeze(-1)
        return read_objects(density, probs, described, self.locate(tokens))

    def forward(self, question, tokens, density, attributes) -> torch.Tensor:
        """-> the attribute values' scores (B, sum(count_attributes)); see `reads`."""
        return self.scores(question, *self.reads(question, tokens, density, attributes))

    def scores(self, question: torch.Tensor, own, nearest) -> torch.Tensor:
        """`weigh`'s weights times the log-probabilities `reads` gave."""
        weights = self.weigh(question).view(-1, 2, len(self.groups))
        scores = [
            weights[:, 0, k : k + 1] * a.clamp_min(1e-6).log()
            + weights[:, 1, k : k + 1] * b.clamp_min(1e-6).log()
            for k, (a, b) in enumerate(zip(own, nearest, strict=True))
        ]
        return torch.cat(scores, dim=-1)


class FusionStream(nn.Module):
    """One stream's half of a fusion layer."""

    def __init__(self, config: TwoStreamConfig):
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        self.norm_self, self.norm_cross, self.norm_mlp = (nn.LayerNorm(d, eps=eps) for _ in range(3))
        self.self_attn = Attention(config)
        self.cross_attn = Attention(config)
        self.fc1 = nn.Linear(d, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, d)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


@dataclass
class FusionAttention:
    """What one fusion layer's attention leaves for a reducer: each stream's self-attention keys
    and the text -> image cross-attention's queries and keys (B, heads, N, head_dim)."""

    text_keys: torch.Tensor
    image_keys: torch.Tensor
    text_cross_queries: torch.Tensor
    image_cross_keys: torch.Tensor
    scale: float


class FusionLayer(nn.Module):
    def __init__(self, config: TwoStreamConfig):
        super().__init__()
        self.text = FusionStream(config)
        self.image = FusionStream(config)

    def attend(self, t, i, text_bias, image_bias) -> tuple[torch.Tensor, torch.Tensor, FusionAttention]:
        """Self-attention of each stream, then cross-attention of each to the other."""
        ts, is_ = self.text, self.image
        qt, kt, vt = ts.self_attn.project(*(2 * (ts.norm_self(t),)))
        qi, ki, vi = is_.self_attn.project(*(2 * (is_.norm_self(i),)))
        t = t + ts.self_attn.output(qt, kt, vt, text_bias)
        i = i + is_.self_attn.output(qi, ki, vi, image_bias)
        ht, hi = ts.norm_cross(t), is_.norm_cross(i)
        q_text, k_image, v_image = ts.cross_attn.project(ht, hi)
        t = t + ts.cross_attn.output(q_text, k_image, v_image, image_bias)
        i = i + is_.cross_attn(hi, ht, text_bias)
        return t, i, FusionAttention(kt, ki, q_text, k_image, ts.cross_attn.scale)

    def feed_forward(self, t, i) -> tuple[torch.Tensor, torch.Tensor]:
        return t + self.text.mlp(self.text.norm_mlp(t)), i + self.image.mlp(self.image.norm_mlp(i))

    def forward(self, t, i, text_bias=None, image_bias=None):
        t, i, _ = self.attend(t, i, text_bias, image_bias)
        return self.feed_forward(t, i)


@dataclass
class TwoStreamOutput(ModelOutput):
    text_hidden_state: torch.Tensor | None = None
    image_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class TwoStreamPreTrainedModel(PreTrainedModel):
    config_class = TwoStreamConfig
    config: TwoStreamConfig
    base_model_prefix = "two_stream"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    _no_split_modules = ["FusionLayer"]


class TwoStreamModel(TwoStreamPreTrainedModel):
    def __init__(self, config: TwoStreamConfig):
        super().__init__(config)
        d = config.hidden_size
        self.vision = AutoModel.from_config(config.vision_config)
        self.text = AutoModel.from_config(config.text_config)
        self.image_proj = nn.Linear(config.vision_config.hidden_size, d)
        self.text_proj = nn.Linear(config.text_config.hidden_size, d)
        self.modality = nn.Embedding(2, d)
        self.layers = nn.ModuleList([FusionLayer(config) for _ in range(config.num_fusion_layers)])
        self.text_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.image_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.text_pool = nn.Linear(d, d)
        self.image_pool = nn.Linear(d, d)
        vision_width, text_width = config.vision_config.hidden_size, config.text_config.hidden_size
        self.text_query = nn.ModuleList(nn.Linear(text_width, vision_width) for _ in config.text_query_layers)
        pooling = {
            "cls": None,
            "text_query": TextQueryPool,
            "two_hop": TwoHopPool,
            "two_hop_placed": PlacedTwoHopPool,
        }[config.image_pooling]
        self.image_query = None if pooling is None else pooling(config)
        self.counter = ObjectCount(config) if config.counts_objects else None
        self.reader = ObjectRead(config) if config.reads_objects else None
        self.post_init()

    @staticmethod
    def question(text_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The text tower's output mean-pooled over the real tokens (as its sentence embedding is
        pooled): (B, text width)."""
        if attention_mask is None:
            return text_states.mean(dim=1)
        w = attention_mask.to(text_states.dtype).unsqueeze(-1)
        return (text_states * w).sum(dim=1) / w.sum(dim=1).clamp_min(1e-6)

    def object_scores(
        self, text_states: torch.Tensor, attention_mask: torch.Tensor | None, tower: torch.Tensor
    ) -> torch.Tensor | None:
        """From the towers' outputs, the count path's scores of the number answers (ObjectCount),
        then the read path's of the attribute values (ObjectRead) if it has one; None without a
        count path."""
        if self.counter is None:
            return None
        question, tokens = self.question(text_states, attention_mask), tower[:, 1:]
        density, attributes = self.counter.detections(tokens)
        counts = self.counter.scores(question, density, attributes)
        if self.reader is None:
            return counts
        return torch.cat([counts, self.reader(question, tokens, density, attributes)], dim=-1)

    def text_queries(self, text_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The question as a query for each vision tower layer: (B, tower layers, vision width),
        from the text tower's mean-pooled output (`question`) through each layer's projection;
        zeros at layers without one."""
        pooled = self.question(text_states, attention_mask)
        layers = self.config.vision_config.num_hidden_layers
        queries = pooled.new_zeros(pooled.shape[0], layers, self.config.vision_config.hidden_size)
        for layer, proj in zip(self.config.text_query_layers, self.text_query, strict=True):
            queries[:, layer] = proj(pooled)
        return queries

    def vision_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision tower's last hidden state (with the tower's own final norm, if it has one)."""
        pixel_values = pixel_values.to(self.image_proj.weight.dtype)
        size = self.config.vision_config.image_size
        kwargs = {}
        if "interpolate_pos_encoding" in inspect.signature(self.vision.forward).parameters:
            kwargs["interpolate_pos_encoding"] = tuple(pixel_values.shape[-2:]) != (size, size)
        return self.vision(pixel_values=pixel_values, **kwargs).last_hidden_state

    def text_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def enter(self, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tower outputs -> the fusion width, with their modality embedding added."""
        t = self.text_proj(text) + self.modality.weight[TEXT]
        i = self.image_proj(image) + self.modality.weight[IMAGE]
        return t, i

    def pool(
        self,
        t: torch.Tensor,
        i: torch.Tensor,
        text_weight: torch.Tensor | None,
        image_size: torch.Tensor | None = None,
        counts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Final norms, then [text mean, image summaries] through their poolers:
        (t, i, (B, (1 + config.image_reads) D)), then `counts` (object_scores) if given. See
        pool_and_look."""
        return self.pool_and_look(t, i, text_weight, image_size, counts)[:3]

    def pool_and_look(
        self,
        t: torch.Tensor,
        i: torch.Tensor,
        text_weight: torch.Tensor | None,
        image_size: torch.Tensor | None = None,
        counts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        """pool, and where each image summary read by attention looked: one (B, image tokens)
        head-averaged attention per read ("text_query": one, "two_hop": two, "cls": none). A model
        with a count path needs `counts` (object_scores), which the pooled output ends with.
        text_weight (B, Nt): input tokens each text token stands for, 0 for padding (None: 1 each).
        image_size (B, Ni): patches each image token stands for (None: 1 each).
        The text stream is mean-pooled, as its sentence-embedding tower was trained: its [CLS]
        barely tells "is there a red shape?" from "... blue shape?", and a head reading it could
        only answer from the wording."""
        t, i = self.text_norm(t), self.image_norm(i)
        if text_weight is None:
            text = t.mean(dim=1)
        else:
            w = text_weight.to(t.dtype).unsqueeze(-1)
            text = (t * w).sum(dim=1) / w.sum(dim=1).clamp_min(1e-6)
        if self.image_query is None:
            image, looks = i[:, 0], ()
        elif isinstance(self.image_query, TwoHopPool):
            image, looks = self.image_query(t, text_weight, text, i, image_size)  # (B, reads, D), (B, 2, N)
            looks = tuple(looks.unbind(1))
        else:
            image, look = self.image_query(text, i, image_size)
            looks = (look,)
        image = torch.tanh(self.image_pool(image)).flatten(1)  # the reads side by side
        pooled = torch.cat([torch.tanh(self.text_pool(text)), image], dim=-1)
        if (counts is None) != (self.counter is None):
            raise ValueError(
                "count scores go with a count path: pass object_scores' output to a model with one"
            )
        if counts is not None:
            pooled = torch.cat([pooled, counts], dim=-1)
        return t, i, pooled, looks

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> TwoStreamOutput:
        text_states, vision = self.text_tokens(input_ids, attention_mask), self.vision_tokens(pixel_values)
        counts = self.object_scores(text_states, attention_mask, vision)
        t, i = self.enter(text_states, vision)
        text_bias = padding_bias(attention_mask, t.dtype)
        for layer in self.layers:
            t, i = layer(t, i, text_bias, None)
        t, i, pooled = self.pool(t, i, attention_mask, None, counts)
        return TwoStreamOutput(text_hidden_state=t, image_hidden_state=i, pooler_output=pooled)


def with_product(pooled: torch.Tensor, reads: int = 1) -> torch.Tensor:
    """[text, image] pooled -> [text, image, text * image]. The elementwise product hands the heads
    a bilinear text-image interaction (as MLB/MCB pooling in VQA models): METER's heads see only the
    concatenation and leave every comparison of the two streams to its deep fusion, which two
    fusion layers trained on a small data set do not learn (on easy-VQA they answered "is there a
    red shape?" from its wording alone).
    With several image reads ([text, read 1, read 2, ...]), each read's product with the text, and
    each consecutive pair's product and difference (what "left of" or "bigger than" compares)."""
    t, *images = pooled.chunk(1 + reads, dim=-1)
    pairs = [f for a, b in zip(images, images[1:], strict=False) for f in (a * b, a - b)]
    return torch.cat([pooled, *(t * i for i in images), *pairs], dim=-1)


def head_width(config: TwoStreamConfig) -> int:
    """Width of with_product's output: 1 + 2 reads + 2 (reads - 1) vectors of hidden_size."""
    return (4 * config.image_reads - 1) * config.hidden_size


class TwoStreamForQuestionAnswering(TwoStreamPreTrainedModel):
    """Answer classifier on the pooled streams and their product (METER's VQA head, plus the
    product: see with_product)."""

    def __init__(self, config: TwoStreamConfig):
        super().__init__(config)
        self.two_stream = TwoStreamModel(config)
        d = 2 * config.hidden_size
        self.classifier = nn.Sequential(
            nn.Linear(head_width(config), d),
            nn.LayerNorm(d, eps=config.layer_norm_eps),
            nn.GELU(),
            nn.Linear(d, config.num_labels),
        )
        self.post_init()

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled (TwoStreamModel.pool) -> answer logits; the object paths' scores (pooled's last
        columns: object_scores) add to the logits of the answers they score."""
        config = self.config
        if not config.counts_objects:
            return self.classifier(with_product(pooled, config.image_reads))
        labels = torch.tensor([*config.count_labels, *config.read_labels], device=pooled.device)
        logits = self.classifier(with_product(pooled[:, : -len(labels)], config.image_reads))
        # row j: the one-hot of the label score j adds to (zeros for a value that is no answer)
        to_labels = F.one_hot(labels.clamp_min(0), config.num_labels).to(logits.dtype)
        to_labels = to_labels * (labels >= 0).to(logits.dtype).unsqueeze(-1)
        return logits + pooled[:, -len(labels) :] @ to_labels

    def forward(self, input_ids, pixel_values, attention_mask=None, **kwargs) -> TwoStreamOutput:
        out = self.two_stream(input_ids, pixel_values, attention_mask)
        out.logits = self.head(out.pooler_output)
        return out


class TwoStreamForImageTextMatching(TwoStreamPreTrainedModel):
    """One image-text matching logit per pair on the pooled streams and their product."""

    def __init__(self, config: TwoStreamConfig):
        super().__init__(config)
        self.two_stream = TwoStreamModel(config)
        self.rank_output = nn.Linear(head_width(config), 1)
        self.post_init()

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.rank_output(with_product(pooled, self.config.image_reads))

    def forward(self, input_ids, pixel_values, attention_mask=None, **kwargs) -> TwoStreamOutput:
        out = self.two_stream(input_ids, pixel_values, attention_mask)
        out.logits = self.head(out.pooler_output)
        return out
