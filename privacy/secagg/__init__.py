"""Secure aggregation (SecAgg+ in three exchanges per round, against a malicious server), quantization and distributed DP.

A pure library: messages are plain dicts that Flower's records can carry. See
:mod:`fedpersona.privacy.secagg.spec` for the protocol and its reasoning (:mod:`~fedpersona.privacy.secagg.client_side`,
:mod:`~fedpersona.privacy.secagg.server_side`, :mod:`~fedpersona.privacy.secagg.driver`: its two sides and an in-process driver),
:mod:`fedpersona.privacy.secagg.quantize` for the modulus and error bounds, :mod:`fedpersona.privacy.secagg.ddp` for
distributed discrete Gaussian noise and its accountant.

Client side (per device)::

    client = SecAggClient(node_id, config, identity=identity)   # keys from SecAggClient.from_state(saved, ...)
    advert = client.advertise(run_id=run_id)             # once per run -> server.register(advert)
    reply1 = client.masked_input(request1, update, {"num_examples": n})   # or client.decline(request1)
    reply2 = client.consistency(request2)                # signs the survivor set, once per round
    reply3 = client.unmask(request3)                     # only for the set it signed, with a quorum of signatures

Server side (per run, per round)::

    server = SecAggServer(config, run_id=run_id)
    rnd = server.start_round(round, cohort, length, context=b"")
    requests1 = rnd.masked_input_requests()              # {client_id: dict}
    rnd.receive_masked(reply1) ...
    requests2 = rnd.consistency_requests()               # {survivor_id: dict}
    rnd.receive_consistency(reply2) ...
    requests3 = rnd.unmask_requests()                    # {signer_id: dict}
    rnd.receive_unmask(reply3) ...
    result = rnd.finish()                                # result.total, result.extras
"""

from fedpersona.privacy.secagg.client_side import SecAggClient
from fedpersona.privacy.secagg.crypto import ClientKeys, DecryptionError, SecureRNG
from fedpersona.privacy.secagg.ddp import ddp_epsilon, ddp_rdp, local_noise_stddev, sample_discrete_gaussian
from fedpersona.privacy.secagg.driver import SecAggStats, run_secure_sum
from fedpersona.privacy.secagg.quantize import ExtraSpec, Quantizer, max_cohort, modulus_bits, quantized_l2_bound
from fedpersona.privacy.secagg.server_side import SecAggResult, SecAggRound, SecAggServer
from fedpersona.privacy.secagg.shamir import ShamirError
from fedpersona.privacy.secagg.spec import SecAggAbort, SecAggParams, SecAggInputError, payload_nbytes

__all__ = [
    "ClientKeys", "DecryptionError", "ExtraSpec", "Quantizer", "SecAggAbort", "SecAggClient", "SecAggParams",
    "SecAggInputError", "SecAggResult", "SecAggRound", "SecAggServer", "SecAggStats", "SecureRNG", "ShamirError",
    "ddp_epsilon", "ddp_rdp", "local_noise_stddev", "max_cohort", "modulus_bits", "payload_nbytes",
    "quantized_l2_bound", "run_secure_sum", "sample_discrete_gaussian",
]
