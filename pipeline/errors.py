"""Every error `pipeline` raises or records, in two families, and the row problems between.

Failures of the run are exceptions; they stop the job and map to an exit code:

    PipelineError                 exit_code
    ├── JobError                  2   bad job file, input or template; nothing was sent
    │   ├── SpecError                 the job file
    │   ├── InputError                the input table
    │   ├── TemplateError             the templates
    │   ├── Untrusted                 a host or path only the job file names, unconfirmed
    │   ├── OutputRefused             the output or checkpoint cannot be written there
    │   ├── CheckpointError           a checkpoint that cannot be trusted (garbage,
    │   │                             truncated, its -wal lost, another job's or version's)
    │   └── BudgetTooSmall            --max-cost below what the prompts alone cost
    ├── BudgetReached             3   --max-cost reached
    ├── Halted                    4   the API says stop: auth, quota, unknown model, URL
    ├── OutputError               1   writing the output or checkpoint failed after sending
    └── Interrupted             130   SIGINT
        └── Terminated          143   SIGTERM

Failures of one request are values. Dispatch classifies every attempt into a
`RequestFailure` whose class says what happens next; retrying is a class property,
never a match on a message:

    RequestFailure
    ├── Retryable                 send again after backoff
    │   ├── ConnectFailed             never reached the server: nothing billed
    │   ├── NotAnApi                  a 2xx HTML page (a proxy, a captive portal): not the API
    │   ├── ReadFailed                sent, no usable answer: possibly billed
    │   │   └── NoAnswer                  no answer before the deadline
    │   ├── ServerError               408, 409, 5xx, 529
    │   └── RateLimited               429 rate_limit_exceeded: pause every worker
    ├── RowFailed                 this row fails, no retry (400, 413, 422, too large)
    │   ├── ResponseTooLarge          the answer's body is over the size cap
    │   ├── RowRejected               never sent: a null the job forbids, a template error
    │   │   └── PromptTooLarge            over the context window or the job's TPM
    │   ├── PromptFiltered            the provider's content filter refused the prompt
    │   └── ResponseInvalid           answered, but not JSON / not matching the schema
    │       └── AnswerFiltered            the content filter withheld the answer
    └── Fatal                     halt the run at the first one (401, 402, 403, 404, quota,
                                  a TLS certificate the client cannot trust)

A row that cannot become a request raises a `RowProblem` while it is rendered or built;
the one place that prepares rows catches it (`except RowProblem`) and records the row
as failed with `RowRejected`, before anything is sent:

    RowProblem                    this row cannot become a request (a missing image file)
    ├── NullValue                     a column the template uses is null; nulls = "fail"
    └── RenderFailed                  the template raised for this row
        └── RenderLimit                   past the render time or size limit

`outage` marks failures that say the server as a whole is not serving (it cannot be
reached, or what answers is not the API): dispatch halts the run on a run of them with
no success between, instead of failing every row the same way (faults.py).
"""

from __future__ import annotations


class PipelineError(Exception):
    """A failure of the whole run, shown as one line and an exit code."""

    exit_code = 1


class JobError(PipelineError):
    exit_code = 2


class SpecError(JobError):
    pass


class InputError(JobError):
    pass


class TemplateError(JobError):
    pass


class CheckpointError(JobError):
    """The checkpoint file is not one this run can trust: resuming from it could lose
    paid answers or send them again, and starting over silently would bill every row."""


class BudgetTooSmall(JobError):
    """--max-cost is below the cost of the prompts alone: refused before sending."""


class Untrusted(JobError):
    """The job file alone names where a key goes or where the output is written, and
    the user has not confirmed it (--trust-job-hosts / PIPELINE_TRUST_JOB_HOSTS=1)."""


class OutputRefused(JobError):
    """The output, the checkpoint or a file beside them cannot or must not be written
    there (a symlink, a file no run of this job wrote, no room); nothing was sent."""


class BudgetReached(PipelineError):
    exit_code = 3


class Halted(PipelineError):
    exit_code = 4


class OutputError(PipelineError):
    """Writing failed once requests were sent: the answers stay in the checkpoint."""

    exit_code = 1


class Interrupted(PipelineError):
    exit_code = 130


class Terminated(Interrupted):
    """SIGTERM: a supervisor (systemd, Kubernetes, a CI runner) stopped the run."""

    exit_code = 143


class RequestFailure(Exception):
    """One attempt's failure. `kind` is the short name written to `error_type`."""

    kind = "error"
    retryable = False
    #: The request may have reached the model and been billed.
    maybe_billed = True
    #: Many rows failing the same way says the job is wrong (the request's shape), not
    #: the rows. False for failures about a row's own content, however many there are.
    job_signal = True
    #: The server as a whole is not serving (unreachable, or not the API): a run of these
    #: with no success between halts the run rather than failing each row.
    outage = False

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        no_retry: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        #: Seconds the server asked us to wait, if it said.
        self.retry_after = retry_after
        #: The server sent `x-should-retry: false`.
        self.no_retry = no_retry

    @property
    def should_retry(self) -> bool:
        return self.retryable and not self.no_retry


class Retryable(RequestFailure):
    retryable = True


class ConnectFailed(Retryable):
    kind = "connect"
    maybe_billed = False
    outage = True


class NotAnApi(Retryable):
    """A 2xx whose body is an HTML page: a proxy's, a captive portal's, a web site's."""

    kind = "not_api"
    maybe_billed = False
    outage = True


class ReadFailed(Retryable):
    kind = "read"


class NoAnswer(ReadFailed):
    """Connected and sent, but no answer came before the deadline."""

    outage = True


class ServerError(Retryable):
    kind = "server"
    maybe_billed = False

    def __init__(self, message: str, *, slow_down: bool = False) -> None:
        super().__init__(message)
        #: 503 "slow down" or 529 overloaded: the rate should drop too.
        self.slow_down = slow_down


class RateLimited(Retryable):
    kind = "rate_limit"
    maybe_billed = False


class RowFailed(RequestFailure):
    kind = "invalid_request"
    maybe_billed = False


class ResponseTooLarge(RowFailed):
    """The answer's decoded body is over the cap (a gzip bomb, a runaway answer)."""

    kind = "response_too_large"
    maybe_billed = True
    job_signal = False


class RowRejected(RowFailed):
    """The row could not be made into a request (a null the job forbids, a template error)."""

    kind = "invalid_row"


class PromptTooLarge(RowRejected):
    """Never sent: the prompt is over the model's context window, or the request over
    the job's tokens per minute (it could never be admitted)."""

    kind = "too_large"
    job_signal = False


class PromptFiltered(RowFailed):
    """The provider's content filter refused this row's prompt (Azure: 400 content_filter)."""

    kind = "content_filter"
    job_signal = False


class ResponseInvalid(RowFailed):
    """The answer arrived but does not satisfy the job (JSON schema, empty content)."""

    kind = "invalid_response"
    maybe_billed = True
    #: The answer that failed, kept so its text, usage and cost are recorded.
    answer: object = None


class AnswerFiltered(ResponseInvalid):
    """The provider's content filter withheld the answer (finish_reason content_filter)."""

    kind = "content_filter"
    job_signal = False


class Fatal(RequestFailure):
    kind = "fatal"
    maybe_billed = False


class RowProblem(ValueError):
    """This row cannot become a request (a missing image file, say): the row fails."""


class NullValue(RowProblem):
    """A column the template uses is null in this row, and the job says fail."""

    def __init__(self, column: str) -> None:
        super().__init__(f'column `{column}` is null in this row (template.nulls = "fail")')
        self.column = column


class RenderFailed(RowProblem):
    """The template raised for this row (a filter on a bad value, say)."""


class RenderLimit(RenderFailed):
    """The template ran past the render time or size limit on this row."""


def first_line(err: Exception) -> str:
    """A foreign exception's message, cut to its first line for ours to quote."""
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__
