"""Issue 20.1, as a dishonest server would try it: a victim in a cohort with node ids whose keys the server made.

Before (cb416a4): the server put the victim in a cohort of three with two node ids whose key pairs it had
generated itself. The device masked against whatever neighbour keys it was handed; the server knew both
pair seeds and decrypted two of the three shares of the victim's self-mask (t = 2): it read the update
(max error 9.2e-7) without a single unmask request. Now every key a device masks against must be bound
to an identity certified by the device's trust root (the operator's, which the server never holds),
signed by that identity for that node id in that run, each identity used once: the device refuses such
a request before it trains, and the server gets no masked vector.

Through the real ClientApp (its handlers and mods); the devices' training is the fixed update of
``tests/server/test_secagg.FakeDevice``.
"""

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Message, RecordDict

import fedpersona.client.app as client_app
from fedpersona.identity import IdentityRoot
from fedpersona.secagg_wire import from_records, to_records
from fedpersona.privacy.secagg import SecAggClient, SecAggServer, shamir
from fedpersona.privacy.secagg.crypto import DecryptionError, MaskExpander, open_sealed
from fedpersona.privacy.secagg.quantize import unpack_bits
from fedpersona.privacy.secagg.settings import secagg_params
from fedpersona.privacy.secagg.spec import _pair_seed, _share_ad, _share_key, _RoundSetup
from tests.server.test_secagg import DIM, RUN_ID, _content, _expected_sum, federation  # noqa: F401  (fixture)

VICTIM, HONEST, FAKES = 11, 12, (901, 902)


def _send(grid, node, message_type, content):
    msg = Message(content, dst_node_id=node, message_type=message_type, group_id="1")
    msg.metadata.__dict__["_message_id"] = f"{message_type}-{node}-{id(content)}"
    return client_app.app(msg, grid.contexts[node])


def _advert(client):
    try:
        return client.advertise(run_id=RUN_ID)
    except TypeError:  # a library without identities
        return client.advertise()


def _fake_material(kind: str, fake: SecAggClient, honest_advert: dict) -> dict:
    """What the server presents for a fake node: its own keys, and whatever binding it can come up with."""
    keys = {"enc_pk": fake.keys.enc_public, "mask_pk": fake.keys.mask_public,
            "sign_pk": getattr(fake.keys, "sign_public", bytes(32))}
    zero = {"identity": bytes(32), "certificate": bytes(64), "binding": bytes(64)}
    if kind == "unbound":
        return {**keys, **zero}
    from fedpersona.privacy.secagg.spec import binding_message

    message = binding_message(RUN_ID, fake.client_id, keys["enc_pk"], keys["mask_pk"], keys["sign_pk"])
    if kind == "own-root":  # an identity under a root the server made itself
        ident = IdentityRoot().issue()
        return {**keys, "identity": ident.public, "certificate": ident.certificate, "binding": ident.sign(message)}
    if kind == "stolen-certificate":  # an honest device's identity and certificate, the binding signed by the server
        return {**keys, "identity": honest_advert["identity"], "certificate": honest_advert["certificate"],
                "binding": Ed25519PrivateKey.generate().sign(message)}
    if kind == "replayed-binding":  # an honest device's whole advertisement (keys and binding), under a fake node id
        return {k: honest_advert.get(k, bytes(size)) for k, size in (("enc_pk", 32), ("mask_pk", 32), ("sign_pk", 32),
                ("identity", 32), ("certificate", 64), ("binding", 64))}
    raise AssertionError(kind)


def attack(cfg, grid, kind: str):
    """The server's attempt; returns (the victim's reply, the update the server read or None)."""
    params = secagg_params(cfg)
    victim_advert = from_records(_send(grid, VICTIM, "query.advertise", RecordDict()).content)
    honest_advert = from_records(_send(grid, HONEST, "query.advertise", RecordDict()).content)
    fakes = {f: SecAggClient(f, params) for f in FAKES}
    server = SecAggServer(params, run_id=RUN_ID)
    server.register(victim_advert)
    for f in FAKES:
        server.register(_advert(fakes[f]))
    rnd = server.start_round(1, [VICTIM, *FAKES], DIM)
    request = rnd.masked_input_requests()[VICTIM]
    material = {f: _fake_material(kind, fakes[f], honest_advert) for f in FAKES}
    neighbours = [int(x) for x in request["neighbours"]]
    plural = {"enc_pk": "enc_pks", "mask_pk": "mask_pks", "sign_pk": "sign_pks", "identity": "identities",
              "certificate": "certificates", "binding": "bindings"}
    for field, name in plural.items():
        request[f"neighbour_{name}"] = b"".join(material[v][field] for v in neighbours)
    request.update(self_enc_pk=victim_advert["enc_pk"], self_mask_pk=victim_advert["mask_pk"],
                   self_sign_pk=victim_advert.get("sign_pk", b""))
    reply = _send(grid, VICTIM, "train", RecordDict({**dict(_content()), **to_records(request)}))
    if reply.has_error():
        return reply, None
    payload = from_records(reply.content)
    # The server holds the fakes' secret keys: their shares of the victim's self-mask, and both pair seeds.
    setup = _RoundSetup.from_fields(request, what="attack")
    digest, holders = setup.digest, [int(h) for h in payload["share_holders"]]
    size = len(payload["ciphertexts"]) // len(holders)
    shares = []
    for j, h in enumerate(holders):
        if h not in FAKES:
            continue
        key = _share_key(fakes[h].keys, VICTIM, h, victim_advert["enc_pk"], digest)
        try:
            plain = open_sealed(key, payload["ciphertexts"][j * size:(j + 1) * size],
                                _share_ad(RUN_ID, 1, VICTIM, h, digest), what="attack")
        except DecryptionError:  # shares sealed to keys the server does not hold
            return reply, None
        shares.append((shamir.point_of(h), shamir.share_from_bytes(plain, what="attack")[0]))
    width = setup.length + setup.num_extras
    y = unpack_bits(payload["masked"], setup.modulus_bits, width)
    expander = MaskExpander(width)
    expander.add_into(y, shamir.reconstruct(shares, setup.threshold), -1)
    for f in FAKES:
        seed = _pair_seed(fakes[f].keys, f, VICTIM, victim_advert["mask_pk"], digest)
        expander.add_into(y, seed, -1 if VICTIM < f else 1)
    y &= np.uint64((1 << setup.modulus_bits) - 1)
    return reply, params.quantizer.decode_sum(y, setup.length)[0]


@pytest.mark.parametrize("kind", ["unbound", "own-root", "stolen-certificate", "replayed-binding"])
def test_fake_neighbours_get_nothing(federation, kind):  # noqa: F811
    cfg, grid = federation(**{"server.clients-per-round": 3})
    reply, recovered = attack(cfg, grid, kind)
    truth = np.concatenate([v.double().numpy().ravel() for _, v in sorted(_expected_sum(cfg, grid, [VICTIM]).items())])
    assert recovered is None or np.max(np.abs(recovered - truth)) > 1e-3, "the victim's update was read"
    assert reply.has_error(), "the victim sent a masked vector to a cohort of forged keys"
    assert reply.error.reason.startswith("SecAggInputError: "), reply.error.reason
    # Refused before training: no masked input recorded, so no unmask would ever be answered for this round.
    from fedpersona.client.secagg import RevealLog
    from fedpersona.client.store import DeviceStore

    assert RevealLog(DeviceStore(grid.contexts[VICTIM].node_config["state-dir"])).latest(RUN_ID) is None


def test_the_same_request_with_real_neighbours_is_answered(federation):  # noqa: F811
    """The control: the victim masks for a cohort of real, certified devices (the refusal above is about the keys)."""
    from fedpersona.server.secagg import SecureAggregator

    cfg, grid = federation(**{"server.clients-per-round": 3})
    rs = SecureAggregator(cfg, run_id=RUN_ID).collect(grid, [VICTIM, HONEST, 13], _content(), server_round=1,
                                                      timeout=None)
    assert not rs.aborted and rs.contributors == 3 and rs.failures == []
