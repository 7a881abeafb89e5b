// The request head checks http_server.cc makes before answering: libmicrohttpd 0.9.75 accepts
// heads RFC 9112 lets a server refuse (bare LF, NUL, extra spaces) and has no option to refuse
// them, so these read what it left in its buffer (http_request_head.cc says how).
#ifndef CUSTODY_METRICS_HTTP_REQUEST_HEAD_H_
#define CUSTODY_METRICS_HTTP_REQUEST_HEAD_H_

#include <microhttpd.h>

namespace custody::metrics {

// MHD_OPTION_URI_LOG_CALLBACK: called with the request target as sent (before its query is split
// off and it is unescaped), NUL-terminated where the space before the version was. A target
// that is visible ASCII and is followed by exactly "HTTP/1.x" and the line's end had neither a
// NUL nor a space in it. Its result becomes the request's state.
void* CheckRequestTarget(void* cls, const char* target, MHD_Connection* connection);

// True when the request's head is HTTP/1.1 as RFC 9112 writes it: CRLF line ends, one space
// between the request line's parts, tokens for the method and field names, no NUL or bare CR.
// `target_check` is what CheckRequestTarget returned for this request. Always true on another
// libmicrohttpd release than 0.9.75 (its buffer may be laid out otherwise).
bool HeadIsWellFormed(MHD_Connection* connection, const char* url, const char* method,
                      const char* version, void* target_check);

}  // namespace custody::metrics

#endif  // CUSTODY_METRICS_HTTP_REQUEST_HEAD_H_
