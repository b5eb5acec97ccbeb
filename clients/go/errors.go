package marie

import (
	"errors"
	"fmt"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Error is a failed call: the gRPC code plus the google.rpc.ErrorInfo
// Marie's services send in grpc-status-details-bin (a stable UPPER_SNAKE
// Reason, a Domain and string Metadata such as "field"). Without one, Reason
// is the code's name. Get it with errors.As.
type Error struct {
	Code     codes.Code
	Message  string
	Reason   string
	Domain   string
	Metadata map[string]string
	cause    error
}

func (e *Error) Error() string {
	return fmt.Sprintf("marie: %s: %s (%s)", e.Code, e.Message, e.Reason)
}

// Unwrap gives the original gRPC status error.
func (e *Error) Unwrap() error { return e.cause }

// GRPCStatus lets status.FromError and status.Code see through Error.
func (e *Error) GRPCStatus() *status.Status {
	if s, ok := status.FromError(e.cause); ok {
		return s
	}
	return status.New(e.Code, e.Message)
}

// Field is the request field an INVALID_ARGUMENT names, or "".
func (e *Error) Field() string { return e.Metadata["field"] }

// codeName is the gRPC name of a code: codes.InvalidArgument -> "INVALID_ARGUMENT".
var codeNames = map[codes.Code]string{
	codes.OK: "OK", codes.Canceled: "CANCELLED", codes.Unknown: "UNKNOWN",
	codes.InvalidArgument: "INVALID_ARGUMENT", codes.DeadlineExceeded: "DEADLINE_EXCEEDED",
	codes.NotFound: "NOT_FOUND", codes.AlreadyExists: "ALREADY_EXISTS",
	codes.PermissionDenied: "PERMISSION_DENIED", codes.ResourceExhausted: "RESOURCE_EXHAUSTED",
	codes.FailedPrecondition: "FAILED_PRECONDITION", codes.Aborted: "ABORTED",
	codes.OutOfRange: "OUT_OF_RANGE", codes.Unimplemented: "UNIMPLEMENTED",
	codes.Internal: "INTERNAL", codes.Unavailable: "UNAVAILABLE", codes.DataLoss: "DATA_LOSS",
	codes.Unauthenticated: "UNAUTHENTICATED",
}

// FromError decodes an error from any gRPC call (the generated stubs'
// included) into *Error; nil for nil.
func FromError(err error) *Error {
	if err == nil {
		return nil
	}
	var known *Error
	if errors.As(asError(err), &known) {
		return known
	}
	return nil
}

// asError turns any error from a call into *Error (nil stays nil).
func asError(err error) error {
	if err == nil {
		return nil
	}
	var known *Error
	if errors.As(err, &known) {
		return err
	}
	s, ok := status.FromError(err)
	if !ok {
		// A context error raised before the call reached the wire.
		s = status.FromContextError(err)
	}
	out := &Error{Code: s.Code(), Message: s.Message(), Reason: codeNames[s.Code()], cause: err}
	for _, detail := range s.Details() {
		if info, isInfo := detail.(*errdetails.ErrorInfo); isInfo {
			out.Reason, out.Domain, out.Metadata = info.GetReason(), info.GetDomain(), info.GetMetadata()
		}
	}
	if out.Metadata == nil {
		out.Metadata = map[string]string{}
	}
	return out
}
