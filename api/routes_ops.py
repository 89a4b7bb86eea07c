"""Operations: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import State
from api.errors import Problem, problem_responses
from api.schemas import HealthResponse, ReadyResponse

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=HealthResponse, summary="The process is alive")
async def healthz() -> HealthResponse:
    return HealthResponse()


@router.get("/readyz", response_model=ReadyResponse, responses=problem_responses(503),
            summary="Model and index loaded and consistent (503 otherwise)")
async def readyz(state: State) -> ReadyResponse:
    problem = state.ready_problem()
    if problem is not None:
        raise Problem(503, "Not ready", problem, headers={"Retry-After": "5"})
    return ReadyResponse(**state.describe())


@router.get("/metrics", summary="Prometheus metrics (text exposition format)",
            response_class=Response, responses={200: {"description": "the exposition text",
                                                       "content": {"text/plain": {}}}})
async def metrics(state: State) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
