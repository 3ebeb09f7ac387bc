"""Errors a request can cause, carrying the HTTP status and OpenAI's error type and code."""

from __future__ import annotations

from lora_dist.errors import UserError


class RequestError(UserError):
    """A request that cannot be served as sent; `status` is the HTTP status to answer with."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.param = param

    @property
    def type(self) -> str:
        """OpenAI's error type: every client error is an invalid request."""
        return "server_error" if self.status >= 500 else "invalid_request_error"

    def body(self) -> dict:
        """The JSON body OpenAI's API answers errors with."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def unknown_model(name: str, known: list[str]) -> RequestError:
    """404 for a `model` that names neither the base nor a loaded adapter."""
    shown = ", ".join(known[:8]) + (", ..." if len(known) > 8 else "")
    return RequestError(
        f"The model `{name}` does not exist; the models are: {shown}",
        status=404,
        code="model_not_found",
        param="model",
    )
