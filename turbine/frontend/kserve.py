"""KServe v2 gRPC edge (`--kserve-grpc-server`): every discovered model, text in and text out.

A request carries its prompt in the `text_input` BYTES tensor (one element) and its sampling options
as request parameters (`max_tokens`, `temperature`, `top_p`, `seed`, `stop`, `ignore_eos`,
`min_tokens`, `streaming`). It becomes an OpenAI `CompletionRequest`, so validation is the HTTP
edge's. The reply is the `text_output` BYTES tensor, in `raw_output_contents` as Triton does, with
`finish_reason`, `prompt_tokens` and `completion_tokens` as response parameters.

`ModelInfer` answers once with the whole text. `ModelStreamInfer` (Triton's decoupled streaming)
answers each request with one response per text delta, the last one carrying
`triton_final_response=true`; with `streaming=false` it answers once. Requests on one stream run
concurrently. Errors are gRPC status codes on unary calls (unknown model → NOT_FOUND, bad tensor or
parameter → INVALID_ARGUMENT) and `error_message` on the stream, which stays open.

Requests are counted in the frontend's Prometheus metrics as HTTP ones are (`FrontendMetrics`), under
the endpoints `grpc_infer` and `grpc_stream_infer` (one per request on a stream), with the gRPC status
code's name as the status (an error on a stream counts with the code a unary call would have had).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf.internal.containers import MessageMap
from grpc import aio

import turbine
from turbine.errors import InvalidRequest, TurbineError
from turbine.frontend import kserve_codec as codec
from turbine.frontend.kserve_proto import grpc_service_pb2 as pb
from turbine.frontend.kserve_proto import grpc_service_pb2_grpc as pb_grpc
from turbine.frontend.metrics import FrontendMetrics, RequestMetrics
from turbine.frontend.models import ModelRegistry
from turbine.frontend.openai_format import new_id
from turbine.frontend.pipeline import Generation
from turbine.preprocess.preprocessor import Prepared
from turbine.protocol.openai import CompletionRequest
from turbine.router.front import route_hints

log = logging.getLogger(__name__)

PLATFORM = "turbine"
FINAL = "triton_final_response"
# The `endpoint` label of gRPC requests in the request counters.
UNARY_ENDPOINT = "grpc_infer"
STREAM_ENDPOINT = "grpc_stream_infer"


def param_value(param: pb.InferParameter) -> codec.ParamValue | None:
    which = param.WhichOneof("parameter_choice")
    if which is None:
        return None
    value: codec.ParamValue = getattr(param, which)
    return value


def _set_param(params: MessageMap[str, pb.InferParameter], key: str, value: codec.ParamValue) -> None:
    target = params[key]
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    else:
        target.string_param = value


def read_text_input(request: pb.ModelInferRequest) -> str:
    """The prompt: the one element of the `text_input` BYTES tensor (raw or typed contents)."""
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidRequest("raw_input_contents must hold one entry per input tensor")
    text: str | None = None
    for index, tensor in enumerate(request.inputs):
        if tensor.name != codec.TEXT_INPUT:
            raise InvalidRequest(
                f"unexpected input tensor '{tensor.name}'; only '{codec.TEXT_INPUT}' is accepted"
            )
        if tensor.datatype != codec.BYTES:
            raise InvalidRequest(
                f"input '{codec.TEXT_INPUT}' must have datatype {codec.BYTES}, not '{tensor.datatype}'"
            )
        if request.raw_input_contents:
            elements = codec.decode_bytes_tensor(request.raw_input_contents[index])
        else:
            elements = list(tensor.contents.bytes_contents)
        text = codec.text_from_elements(elements, tensor.shape)
    if text is None:
        raise InvalidRequest(f"input tensor '{codec.TEXT_INPUT}' is required")
    for output in request.outputs:
        if output.name != codec.TEXT_OUTPUT:
            raise InvalidRequest(f"unknown output '{output.name}'; this model has only '{codec.TEXT_OUTPUT}'")
    return text


def request_params(request: pb.ModelInferRequest) -> codec.SamplingParams:
    values: dict[str, codec.ParamValue] = {}
    for key, param in request.parameters.items():
        value = param_value(param)
        if value is not None:
            values[key] = value
    return codec.sampling_params(values)


def completion_request(model: str, text: str, params: codec.SamplingParams) -> CompletionRequest:
    return CompletionRequest(
        model=model,
        prompt=text,
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        seed=params.seed,
        stop=params.stop,
        ignore_eos=params.ignore_eos,
        min_tokens=params.min_tokens,
    )


def infer_response(
    request: pb.ModelInferRequest,
    text: str,
    *,
    finish_reason: str | None = None,
    gen: Generation | None = None,
    final: bool | None = None,
) -> pb.ModelInferResponse:
    """One response holding `text` in `text_output` (raw BYTES, shape [1])."""
    response = pb.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version, id=request.id
    )
    response.outputs.add(name=codec.TEXT_OUTPUT, datatype=codec.BYTES, shape=[1])
    response.raw_output_contents.append(codec.encode_bytes_tensor([text.encode("utf-8")]))
    if finish_reason is not None:
        _set_param(response.parameters, "finish_reason", finish_reason)
    if gen is not None:
        _set_param(response.parameters, "prompt_tokens", gen.prompt_tokens)
        _set_param(response.parameters, "completion_tokens", gen.completion_tokens)
    if final is not None:
        _set_param(response.parameters, FINAL, final)
    return response


def _status(exc: TurbineError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.INTERNAL)


class KServeService(pb_grpc.GRPCInferenceServiceServicer):
    """The servicer: health, metadata and inference over the model registry."""

    def __init__(self, registry: ModelRegistry, metrics: FrontendMetrics | None = None) -> None:
        self._registry = registry
        # Tests may serve without metrics; the frontend shares its HTTP edge's.
        self._metrics = metrics if metrics is not None else FrontendMetrics()

    # --------------------------------------------------------------------- health and metadata

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: aio.ServicerContext[object, object]
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: aio.ServicerContext[object, object]
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: aio.ServicerContext[object, object]
    ) -> pb.ModelReadyResponse:
        # --router-min-initial-workers: not ready until the model has had that many workers.
        ready = any(p.name == request.name and p.routing.ready for p in self._registry.models())
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: aio.ServicerContext[object, object]
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=PLATFORM, version=turbine.__version__, extensions=["model_configuration", "streaming"]
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: aio.ServicerContext[object, object]
    ) -> pb.ModelMetadataResponse:
        name = await self._known(request.name, context)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=name,
            versions=["1"],
            platform=PLATFORM,
            inputs=[tensor(name=codec.TEXT_INPUT, datatype=codec.BYTES, shape=[1])],
            outputs=[tensor(name=codec.TEXT_OUTPUT, datatype=codec.BYTES, shape=[-1])],
        )

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: aio.ServicerContext[object, object]
    ) -> pb.ModelConfigResponse:
        name = await self._known(request.name, context)
        config = pb.ModelConfig(
            name=name,
            platform=PLATFORM,
            backend=PLATFORM,
            max_batch_size=0,
            input=[pb.ModelInput(name=codec.TEXT_INPUT, data_type=pb.TYPE_STRING, dims=[1])],
            output=[pb.ModelOutput(name=codec.TEXT_OUTPUT, data_type=pb.TYPE_STRING, dims=[-1])],
            model_transaction_policy=pb.ModelTransactionPolicy(decoupled=True),
        )
        return pb.ModelConfigResponse(config=config)

    async def _known(self, name: str, context: aio.ServicerContext[object, object]) -> str:
        try:
            return self._registry.get(name).name
        except TurbineError as exc:
            await context.abort(_status(exc), exc.message)

    # -------------------------------------------------------------------------------- inference

    async def _start(
        self, request: pb.ModelInferRequest, context: aio.ServicerContext[object, object]
    ) -> tuple[Generation, codec.SamplingParams, RequestMetrics]:
        params = request_params(request)
        text = read_text_input(request)
        pipeline = self._registry.get(request.model_name)
        req = completion_request(pipeline.name, text, params)
        request_id = request.id or new_id("kserve")
        prepared: Prepared = await pipeline.preprocessor.completion(req, request_id)
        # Routing hints (x-session-id, x-worker-instance-id) come as call metadata, as HTTP headers.
        metadata = {str(k).lower(): str(v) for k, v in (context.invocation_metadata() or ())}
        hints = route_hints(metadata, None)
        return pipeline.generate(prepared, hints), params, self._metrics.serving(pipeline.name)

    def _count(self, request: pb.ModelInferRequest, endpoint: str, code: grpc.StatusCode) -> None:
        rejected = code == grpc.StatusCode.UNAVAILABLE
        self._metrics.count(request.model_name, endpoint, code.name, rejected=rejected)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: aio.ServicerContext[object, object]
    ) -> pb.ModelInferResponse:
        # Anything that ends the call other than an answer or a TurbineError (a bug, or the client
        # cancelling) leaves the status as it is here.
        code = grpc.StatusCode.UNKNOWN
        try:
            gen, params, served = await self._start(request, context)
            parts: list[str] = []
            finish: str | None = None
            try:
                if params.streaming:
                    raise InvalidRequest("'streaming' needs ModelStreamInfer", param="streaming")
                async for delta in gen:
                    served.first_token((gen,))
                    parts.append(delta.text)
                    if delta.finish_reason is not None:
                        finish = str(delta.finish_reason)
            finally:
                await gen.aclose()
                served.finish((gen,))
            code = grpc.StatusCode.OK
            return infer_response(request, "".join(parts), finish_reason=finish, gen=gen)
        except TurbineError as exc:
            code = _status(exc)
            await context.abort(code, exc.message)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            self._count(request, UNARY_ENDPOINT, code)

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: aio.ServicerContext[object, object],
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        queue: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()

        async def read_requests() -> None:
            try:
                async with asyncio.TaskGroup() as tg:
                    async for request in request_iterator:
                        tg.create_task(self._stream_one(request, context, queue.put_nowait))
            finally:
                queue.put_nowait(None)

        reader = asyncio.get_running_loop().create_task(read_requests(), name="kserve-stream")
        try:
            while (item := await queue.get()) is not None:
                yield item
            await reader
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _stream_one(
        self,
        request: pb.ModelInferRequest,
        context: aio.ServicerContext[object, object],
        send: Callable[[pb.ModelStreamInferResponse], None],
    ) -> None:
        code = grpc.StatusCode.UNKNOWN
        try:
            gen, params, served = await self._start(request, context)
            try:
                if params.streaming is False:
                    parts: list[str] = []
                    finish: str | None = None
                    async for delta in gen:
                        served.first_token((gen,))
                        parts.append(delta.text)
                        if delta.finish_reason is not None:
                            finish = str(delta.finish_reason)
                    response = infer_response(
                        request, "".join(parts), finish_reason=finish, gen=gen, final=True
                    )
                    send(pb.ModelStreamInferResponse(infer_response=response))
                    code = grpc.StatusCode.OK
                    return
                async for delta in gen:
                    served.first_token((gen,))
                    last = delta.finish_reason is not None
                    response = infer_response(
                        request,
                        delta.text,
                        finish_reason=str(delta.finish_reason) if last else None,
                        gen=gen if last else None,
                        final=last,
                    )
                    send(pb.ModelStreamInferResponse(infer_response=response))
                code = grpc.StatusCode.OK
            finally:
                await gen.aclose()
                served.finish((gen,))
        except TurbineError as exc:
            code = _status(exc)
            send(pb.ModelStreamInferResponse(error_message=exc.message))
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code = grpc.StatusCode.INTERNAL
            log.exception("stream request %s failed", request.id)
            send(pb.ModelStreamInferResponse(error_message=f"internal error: {exc}"))
        finally:
            self._count(request, STREAM_ENDPOINT, code)


class KServeServer:
    """Owns the grpc.aio server: bind on start, drain on stop."""

    def __init__(
        self,
        registry: ModelRegistry,
        host: str,
        port: int,
        credentials: grpc.ServerCredentials | None = None,
        metrics: FrontendMetrics | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._credentials = credentials
        self._server = aio.server()
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(KServeService(registry, metrics), self._server)

    async def start(self) -> None:
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        try:
            if self._credentials is not None:
                bound = self._server.add_secure_port(address, self._credentials)
            else:
                bound = self._server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"cannot bind the KServe gRPC server to {address}: {exc}") from exc
        if bound == 0:
            raise OSError(f"cannot bind the KServe gRPC server to {address}")
        self.port = bound
        await self._server.start()
        log.info("KServe gRPC API on %s%s", address, " (TLS)" if self._credentials is not None else "")

    async def stop(self, grace_s: float | None) -> None:
        """Refuse new RPCs, let in-flight ones finish for `grace_s` seconds, then cancel them."""
        await self._server.stop(grace_s)
