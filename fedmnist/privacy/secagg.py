"""Secure aggregation with pairwise masks: the protocol of Bonawitz et al. 2017.

"Practical Secure Aggregation for Privacy-Preserving Machine Learning" (CCS 2017), honest-but-curious
version (its rounds 0, 1, 2 and 4; the consistency check and signatures of the active-adversary
version are left out). Each client u holds a vector x_u of integers modulo 2^k and:

0. AdvertiseKeys: makes two X25519 key pairs, (c_u) for encrypting to other clients and (s_u) for
   masking, and sends both public keys to the server, which forwards the roster to everyone.
1. ShareKeys: draws a self-mask seed b_u, splits b_u and the secret key s_u into Shamir shares
   (threshold t) and sends each other client v its two shares, encrypted under a key agreed from
   c_u and c_v (ChaCha20-Poly1305), so the server only relays ciphertexts.
2. MaskedInputCollection: sends y_u = x_u + PRG(b_u) + sum_{v>u} PRG(s_uv) - sum_{v<u} PRG(s_uv)
   (mod 2^k), where s_uv is agreed from s_u and v's public key, so s_uv = s_vu and the pairwise
   masks cancel in the sum over all clients. PRG: ChaCha20 keyed by the 32-byte seed.
4. Unmasking: clients still online send, for each client that sent y, their share of its b, and for
   each client that shared keys but dropped before sending y, their share of its s key; the server
   needs t of them. An honest client never reveals both kinds of share for the same client, and
   answers once: two answers to different survivor lists would reveal both.

Clients may drop before sending y (their pairwise masks are removed with their reconstructed s key)
or after sending it but before unmasking (their y stays in the sum; their b is rebuilt from others'
shares). The threshold t must be at least 2 (with t = 1 a single share is the secret) and more than half the
clients: otherwise the server can tell one group of t "u survived" and a disjoint group "u dropped" and,
each client answering once, collect both of u's secrets (`fedmnist.privacy.secure` refuses such thresholds).

The server's whole part is `server_aggregate(view)`: `ServerView` holds every message the server
received in a round, nothing else, so tests can inspect exactly what it learns. `run_protocol`
plays the network between `Client` objects and the server in one process.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import struct
from collections.abc import Collection, Mapping

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedmnist.privacy import shamir

KEY_BYTES = 32
NONCE_BYTES = 12
MIN_PRECISION_BITS = 8  # the least resolution, in bits, a coordinate at the clipping bound may keep
MAX_BITS = 64  # inputs live in uint64
_INDEX = struct.Struct(">I")  # client numbers on the wire
_RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class SecureAggregationError(RuntimeError):
    """The protocol cannot finish this round (too many dropouts, bad messages).

    `view` is what the server had received when the round aborted, when known."""

    view: "ServerView | None" = None


# --- Building blocks -------------------------------------------------------------------------

def derive_key(shared_secret: bytes, purpose: bytes) -> bytes:
    """The key for `purpose` (a pairwise mask's seed, a channel) from a Diffie-Hellman shared secret."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                info=b"fedmnist secagg " + purpose).derive(shared_secret)


def check_bits(bits: int) -> None:
    """ValueError unless 2 <= bits <= 64: a signed value needs a sign bit and at least one more."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 2 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer from 2 to {MAX_BITS}, got {bits!r}")


def modulus_mask(bits: int) -> np.uint64:
    return np.uint64((1 << bits) - 1)


def prg(seed: bytes, length: int, bits: int) -> np.ndarray:
    """`length` pseudorandom integers modulo 2^bits (uint64), expanded from a 32-byte seed."""
    width = 4 if bits <= 32 else 8  # 2^bits divides 2^(8 * width): masking keeps them uniform
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update(bytes(length * width))
    return np.frombuffer(stream, dtype=f"<u{width}").astype(np.uint64) & modulus_mask(bits)


def vector_bytes(bits: int) -> int:
    return math.ceil(bits / 8)


def pack(values: np.ndarray, bits: int) -> bytes:
    """Integers modulo 2^bits as little-endian fields of ceil(bits/8) bytes each."""
    width = vector_bytes(bits)
    return np.ascontiguousarray(values, dtype="<u8").view(np.uint8).reshape(-1, 8)[:, :width].tobytes()


def unpack(data: bytes, length: int, bits: int) -> np.ndarray:
    width = vector_bytes(bits)
    if len(data) != length * width:
        raise SecureAggregationError(f"a masked input has {len(data)} bytes, expected {length * width}")
    fields = np.zeros((length, 8), dtype=np.uint8)
    fields[:, :width] = np.frombuffer(data, dtype=np.uint8).reshape(length, width)
    return fields.view("<u8").reshape(length).astype(np.uint64)


def mask_sign(u: int, v: int) -> int:
    """+1 when u adds the pairwise mask shared with v, -1 when it subtracts it."""
    return 1 if u < v else -1


# --- Messages ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AdvertisedKeys:
    """Round 0: a client's two X25519 public keys (raw 32 bytes each)."""

    encryption: bytes
    masking: bytes

    def size(self) -> int:
        return len(self.encryption) + len(self.masking)


@dataclasses.dataclass(frozen=True)
class UnmaskingResponse:
    """Round 4: one client's shares of survivors' self-mask seeds and of dropped clients' keys."""

    self_mask_shares: dict[int, bytes]
    key_shares: dict[int, bytes]

    def size(self) -> int:
        entries = len(self.self_mask_shares) + len(self.key_shares)
        return entries * (_INDEX.size + shamir.SHARE_BYTES)


@dataclasses.dataclass
class ServerView:
    """Everything the server receives in one round, and the public parameters: nothing else."""

    bits: int
    threshold: int
    length: int
    public_keys: dict[int, AdvertisedKeys] = dataclasses.field(default_factory=dict)
    encrypted_shares: dict[int, dict[int, bytes]] = dataclasses.field(default_factory=dict)
    masked_inputs: dict[int, bytes] = dataclasses.field(default_factory=dict)
    unmasking: dict[int, UnmaskingResponse] = dataclasses.field(default_factory=dict)

    def mean_bytes_sent(self) -> float:
        """Bytes sent per client, averaged over the clients that sent a masked input (else all)."""
        sent = self.bytes_sent()
        senders = [sent[u] for u in self.masked_inputs] or list(sent.values())
        return float(np.mean(senders)) if senders else 0.0

    def bytes_sent(self) -> dict[int, int]:
        """Bytes each client sent to the server over the whole protocol."""
        sent = {u: keys.size() for u, keys in self.public_keys.items()}
        for u, messages in self.encrypted_shares.items():
            sent[u] += sum(len(m) for m in messages.values())
        for u, masked in self.masked_inputs.items():
            sent[u] += len(masked)
        for u, response in self.unmasking.items():
            sent[u] += response.size()
        return sent


# --- A client ----------------------------------------------------------------------------------

class Client:
    """One participant, numbered from 1; `entropy(n)` supplies its random bytes."""

    def __init__(self, index: int, threshold: int, bits: int, entropy=os.urandom):
        if index < 1:
            raise ValueError("client numbers start at 1")
        shamir.check_threshold(threshold)
        check_bits(bits)
        self.index, self.threshold, self.bits = index, threshold, bits
        self._entropy = entropy
        self._encryption_key = X25519PrivateKey.from_private_bytes(entropy(KEY_BYTES))
        self._masking_key = X25519PrivateKey.from_private_bytes(entropy(KEY_BYTES))
        self._self_mask_seed = entropy(KEY_BYTES)
        self._roster: dict[int, AdvertisedKeys] = {}
        self._held: dict[int, tuple[int, int]] = {}  # from u: (share of s_u key, share of b_u)
        self._answered = False  # round 4 is answered at most once

    def advertise_keys(self) -> AdvertisedKeys:
        return AdvertisedKeys(self._encryption_key.public_key().public_bytes(*_RAW),
                              self._masking_key.public_key().public_bytes(*_RAW))

    def share_keys(self, roster: Mapping[int, AdvertisedKeys]) -> dict[int, bytes]:
        """Round 1: encrypted shares of this client's masking key and self-mask seed, per recipient."""
        if len(roster) < self.threshold:
            raise SecureAggregationError(f"secure aggregation aborted: {len(roster)} clients advertised keys, fewer "
                                         f"than the threshold of {self.threshold}")
        if len({keys.masking for keys in roster.values()}) != len(roster):
            raise SecureAggregationError("two clients advertised the same key")
        self._roster = dict(roster)
        key_shares = shamir.split(self._masking_key.private_bytes_raw(), self.threshold, roster, self._entropy)
        seed_shares = shamir.split(self._self_mask_seed, self.threshold, roster, self._entropy)
        self._held[self.index] = (key_shares[self.index], seed_shares[self.index])
        return {v: self._encrypt(v, key_shares[v], seed_shares[v]) for v in roster if v != self.index}

    def receive_shares(self, ciphertexts: Mapping[int, bytes]) -> None:
        """Round 1, relayed by the server: the shares that other clients encrypted for this one."""
        for u, ciphertext in ciphertexts.items():
            self._held[u] = self._decrypt(u, ciphertext)

    def masked_input(self, values: np.ndarray) -> bytes:
        """Round 2: the input modulo 2^k plus its self-mask and the pairwise masks."""
        values = np.asarray(values, dtype=np.uint64)
        masked = values + prg(self._self_mask_seed, len(values), self.bits)
        for v in self._held:  # the clients that completed round 1 (U2)
            if v != self.index:
                peer = X25519PublicKey.from_public_bytes(self._roster[v].masking)
                seed = derive_key(self._masking_key.exchange(peer), b"mask")
                mask = prg(seed, len(values), self.bits)
                masked = masked + mask if mask_sign(self.index, v) > 0 else masked - mask
        return pack(masked & modulus_mask(self.bits), self.bits)

    def unmasking_response(self, survivors: Collection[int], dropped: Collection[int]) -> UnmaskingResponse:
        """Round 4: shares of b for the survivors and of the s key for the dropped, never both.

        One answer per round: a second request with the lists swapped would give the server t shares
        of both this client's b and its s key, hence its input."""
        if self._answered:
            raise SecureAggregationError(f"client {self.index} already answered the unmasking request")
        survivors, dropped = set(survivors), set(dropped)
        if survivors & dropped:
            raise SecureAggregationError(f"the server asked for both shares of clients {sorted(survivors & dropped)}")
        if self.index not in survivors or not (survivors | dropped) <= set(self._held):
            raise SecureAggregationError("the server's survivor list does not match this client's view")
        if len(survivors) < self.threshold:
            raise SecureAggregationError(f"only {len(survivors)} survivors, the threshold is {self.threshold}")
        self._answered = True
        return UnmaskingResponse(
            self_mask_shares={u: shamir.share_to_bytes(self._held[u][1]) for u in sorted(survivors)},
            key_shares={u: shamir.share_to_bytes(self._held[u][0]) for u in sorted(dropped)})

    def _channel(self, other: int) -> ChaCha20Poly1305:
        peer = X25519PublicKey.from_public_bytes(self._roster[other].encryption)
        return ChaCha20Poly1305(derive_key(self._encryption_key.exchange(peer), b"channel"))

    def _encrypt(self, recipient: int, key_share: int, seed_share: int) -> bytes:
        header = _INDEX.pack(self.index) + _INDEX.pack(recipient)
        nonce = self._entropy(NONCE_BYTES)
        body = shamir.share_to_bytes(key_share) + shamir.share_to_bytes(seed_share)
        return nonce + self._channel(recipient).encrypt(nonce, header + body, header)

    def _decrypt(self, sender: int, ciphertext: bytes) -> tuple[int, int]:
        header = _INDEX.pack(sender) + _INDEX.pack(self.index)
        nonce, sealed = ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:]
        try:
            plain = self._channel(sender).decrypt(nonce, sealed, header)
        except Exception as error:  # cryptography raises InvalidTag
            raise SecureAggregationError(f"client {self.index}: shares from client {sender} do not decrypt") from error
        if plain[:len(header)] != header:
            raise SecureAggregationError(f"client {self.index}: shares from client {sender} are misaddressed")
        body = plain[len(header):]
        return (shamir.share_from_bytes(body[:shamir.SHARE_BYTES]),
                shamir.share_from_bytes(body[shamir.SHARE_BYTES:]))


# --- The server --------------------------------------------------------------------------------

def server_aggregate(view: ServerView) -> np.ndarray:
    """The sum modulo 2^k of the inputs of the clients that sent one, from the server's view alone.

    Raises SecureAggregationError when fewer than `threshold` clients answered the unmasking round.
    """
    shamir.check_threshold(view.threshold)
    check_bits(view.bits)
    survivors = set(view.masked_inputs)
    dropped = set(view.encrypted_shares) - survivors
    if len(survivors) < view.threshold:
        raise SecureAggregationError(
            f"secure aggregation aborted: {len(survivors)} of {len(view.public_keys)} clients sent a masked "
            f"update ({len(dropped)} dropped), fewer than the threshold of {view.threshold} needed to unmask the sum")
    if len(view.unmasking) < view.threshold:
        raise SecureAggregationError(
            f"secure aggregation aborted: {len(view.unmasking)} of {len(view.public_keys)} clients "
            f"stayed to unmask the sum, fewer than the threshold of {view.threshold}")
    mask = modulus_mask(view.bits)
    total = np.zeros(view.length, dtype=np.uint64)
    for masked in view.masked_inputs.values():
        total += unpack(masked, view.length, view.bits)
    for u in sorted(survivors):
        seed = _reconstruct(view, u, "self_mask_shares")
        total -= prg(seed, view.length, view.bits)
    for u in sorted(dropped):
        key = X25519PrivateKey.from_private_bytes(_reconstruct(view, u, "key_shares"))
        for v in sorted(survivors):
            seed = derive_key(key.exchange(X25519PublicKey.from_public_bytes(view.public_keys[v].masking)), b"mask")
            mask_uv = prg(seed, view.length, view.bits)
            # Survivor v added mask_sign(v, u) * PRG(s_uv) to its input: take it back out.
            total = total - mask_uv if mask_sign(v, u) > 0 else total + mask_uv
    return total & mask


def _reconstruct(view: ServerView, client: int, kind: str) -> bytes:
    shares = {v: shamir.share_from_bytes(getattr(response, kind)[client])
              for v, response in view.unmasking.items() if client in getattr(response, kind)}
    try:
        return shamir.combine(shares, view.threshold)
    except shamir.NotEnoughSharesError as error:
        raise SecureAggregationError(f"cannot reconstruct client {client}'s secret: {error}") from None


# --- One round, with the network simulated ---------------------------------------------------

def run_protocol(inputs: Mapping[int, np.ndarray], threshold: int, bits: int,
                 dropped: Collection[int] = (), entropy=os.urandom, *,
                 dropped_after_input: Collection[int] = ()) -> tuple[np.ndarray, ServerView]:
    """Runs one round among `inputs` ({client number: integers modulo 2^bits}).

    Clients in `dropped` go offline after sharing their keys (before sending their masked input):
    their input is never read, and their pairwise masks are removed with Shamir recovery of their
    keys. Clients in `dropped_after_input` go offline after sending their masked input, before
    unmasking: their input stays in the sum, their self-masks are rebuilt from others' shares.
    Returns the unmasked sum of the inputs that were sent and the server's view; raises
    SecureAggregationError (with the view so far) when the round must abort.
    """
    _check_round(inputs, threshold, bits, set(dropped), set(dropped_after_input))
    view = ServerView(bits=bits, threshold=threshold, length=len(next(iter(inputs.values()), ())))
    try:
        clients = {u: Client(u, threshold, bits, entropy) for u in sorted(inputs)}
        view.public_keys = {u: client.advertise_keys() for u, client in clients.items()}
        view.encrypted_shares = {u: client.share_keys(view.public_keys) for u, client in clients.items()}
        for v, client in clients.items():  # the server relays each ciphertext to its recipient
            client.receive_shares({u: messages[v] for u, messages in view.encrypted_shares.items() if v in messages})
        view.masked_inputs = {u: client.masked_input(inputs[u]) for u, client in clients.items() if u not in dropped}
        survivors = sorted(view.masked_inputs)
        gone = sorted(set(view.encrypted_shares) - set(survivors))
        if len(survivors) >= threshold:  # below it, honest clients refuse to answer
            view.unmasking = {v: clients[v].unmasking_response(survivors, gone)
                              for v in survivors if v not in dropped_after_input}
        return server_aggregate(view), view
    except SecureAggregationError as error:
        error.view = view
        raise


def _check_round(inputs: Mapping[int, np.ndarray], threshold: int, bits: int, dropped: set[int],
                 dropped_after_input: set[int]) -> None:
    shamir.check_threshold(threshold)
    check_bits(bits)
    if len({len(vector) for vector in inputs.values()}) > 1:
        raise ValueError("all inputs must have the same length")
    if not (dropped | dropped_after_input) <= set(inputs):
        raise ValueError("dropped clients must be among the inputs")
    if dropped & dropped_after_input:
        raise ValueError(f"clients {sorted(dropped & dropped_after_input)} cannot drop both before and after "
                         f"sending their input")


# --- Fixed point: float updates in, integers modulo 2^k out ------------------------------------

def fixed_point_scale(bits: int, clip: float, max_weight: int, num_clients: int) -> float:
    """The largest power of two s such that `num_clients` inputs, each coordinate rounded from at
    most `clip * s` and multiplied by a weight of at most `max_weight`, sum to less than 2^(k-1)
    in size (so the sum modulo 2^k decodes without wrapping); 0.0 when there is no room at all,
    including when the appended weight coordinate alone could wrap (num_clients x max_weight)."""
    check_bits(bits)
    _check_clip(clip)
    _check_count("max_weight", max_weight)
    _check_count("num_clients", num_clients)
    limit = 2 ** (bits - 1) - 1
    if num_clients * max_weight > limit:  # the sum of the weights is a coordinate too
        return 0.0
    room = limit / (num_clients * max_weight) - 0.5
    if room <= 0:
        return 0.0
    return 2.0 ** math.floor(math.log2(room / clip))


def precision_bits(clip: float, scale: float) -> float:
    """How many bits of resolution a coordinate at the clipping bound keeps: log2(clip * scale)."""
    return math.log2(clip * scale) if scale > 0 else -math.inf


def encode(update: np.ndarray, weight: float, clip: float, scale: float, max_weight: int,
           bits: int) -> np.ndarray:
    """A client's input: its update clipped to L2 norm `clip`, rounded to multiples of 1/scale,
    times its integer weight, then the weight itself, modulo 2^bits.

    A weight above `max_weight` raises ValueError: the fixed-point range was sized for that bound,
    and capping the weight would silently change the weighted mean."""
    check_bits(bits)
    _check_clip(clip)
    _check_scale(scale)
    _check_count("max_weight", max_weight)
    update = np.asarray(update, dtype=np.float64)
    if not np.all(np.isfinite(update)):  # as TFF's client work does: such a client gets weight 0
        update, weight = np.zeros_like(update), 0
    weight = int(round(weight))
    if not 0 <= weight <= max_weight:
        raise ValueError(f"a client weight of {weight} is outside 0..{max_weight}, the bound the "
                         f"fixed-point range was sized for")
    quantized = np.rint(clip_l2(update, clip) * scale).astype(np.int64) * weight
    return np.append(quantized, weight).view(np.uint64) & modulus_mask(bits)


def clip_l2(update: np.ndarray, clip: float) -> np.ndarray:
    """`update` scaled down to L2 norm `clip` if it is longer (both secure modes clip so)."""
    norm = float(np.linalg.norm(update))
    return update * (clip / norm) if norm > clip else update


def to_signed(values: np.ndarray, bits: int) -> np.ndarray:
    check_bits(bits)
    values = np.asarray(values, dtype=np.uint64) & modulus_mask(bits)
    if bits == 64:
        return values.view(np.int64)
    signed = values.astype(np.int64)
    return np.where(signed >= 2 ** (bits - 1), signed - 2 ** bits, signed)


def decode_mean(total: np.ndarray, scale: float, bits: int) -> tuple[np.ndarray, int]:
    """The weighted mean update and the total weight from the unmasked sum of encoded inputs."""
    _check_scale(scale)
    signed = to_signed(total, bits)
    weight = int(signed[-1])
    if weight <= 0:
        return np.zeros(len(signed) - 1, dtype=np.float64), weight
    return signed[:-1].astype(np.float64) / (scale * weight), weight


def _check_clip(clip: float) -> None:
    if not (isinstance(clip, numbers.Real) and math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be a finite number above 0, got {clip!r}")


def _check_scale(scale: float) -> None:
    if not (isinstance(scale, numbers.Real) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"the fixed-point scale must be a finite number above 0, got {scale!r} "
                         f"(fixed_point_scale gives 0.0 when the bits leave no room for the clients and weights)")


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer of at least 1, got {value!r}")
