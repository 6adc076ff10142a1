//! WebSockets through the gateway: the caller's upgrade is answered only once a process of the
//! service took the same upgrade (so its refusal, 401, 404 or 429, is the caller's answer), then
//! messages go both ways as they come until either side closes, its close code passed on (1008
//! for a client too slow to keep). Each hop answers its own pings. The upstream is called with
//! the caller's token as an Authorization header, whether it came as one or as the browser's
//! `orderwave.bearer` subprotocol.

use crate::proxy::{Proxy, unavailable};
use axum::extract::FromRequestParts;
use axum::extract::ws::{self, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, protocol::CloseFrame};

type Upstream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Whether a request asks to become a WebSocket.
pub(crate) fn is_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// How a process of the service answered the upgrade.
enum Connected {
    Open(Box<Upstream>),
    /// Refused with a status of the caller's making (4xx): passed on as it is.
    Refused(Response),
}

impl Proxy {
    pub(crate) async fn tunnel(&self, service: &'static str, parts: &mut Parts) -> Response {
        let upgrade = match WebSocketUpgrade::from_request_parts(parts, &()).await {
            Ok(upgrade) => upgrade,
            Err(rejection) => return rejection.into_response(),
        };
        let upstream = match self.upstream(service) {
            Ok(upstream) => upstream,
            Err(refused) => return refused,
        };
        let authorization = match parts.headers.get(header::AUTHORIZATION) {
            Some(value) => Some(value.clone()),
            None => http_kit::auth::websocket_bearer(&parts.headers)
                .and_then(|token| HeaderValue::from_str(&format!("Bearer {token}")).ok()),
        };
        let path = crate::proxy::target(parts);
        let request_id = parts.headers.get("x-request-id").cloned();
        let answer = upstream
            .policy
            .call(|| {
                let url = format!("{}{path}", upstream.url()).replacen("http", "ws", 1);
                let authorization = authorization.clone();
                let request_id = request_id.clone();
                async move {
                    let mut request = url
                        .into_client_request()
                        .map_err(|e| format!("not a WebSocket address: {e}"))?;
                    if let Some(value) = authorization {
                        request.headers_mut().insert(header::AUTHORIZATION, value);
                    }
                    if let Some(value) = request_id {
                        request.headers_mut().insert("x-request-id", value);
                    }
                    match tokio_tungstenite::connect_async(request).await {
                        Ok((socket, _)) => Ok(Connected::Open(Box::new(socket))),
                        Err(tungstenite::Error::Http(refusal))
                            if refusal.status().is_client_error() =>
                        {
                            Ok(Connected::Refused(refused(*refusal)))
                        }
                        Err(error) => Err(format!("the WebSocket upgrade failed: {error}")),
                    }
                }
            })
            .await;
        let socket = match answer {
            Ok(Connected::Open(socket)) => socket,
            Ok(Connected::Refused(response)) => return response,
            Err(error) => return unavailable(service, &error.to_string()),
        };
        let stopping = self.stopping.subscribe();
        upgrade
            .protocols([http_kit::auth::WEBSOCKET_BEARER])
            .on_upgrade(move |client| pump(client, *socket, stopping))
    }
}

/// The upstream's refusal of the upgrade, as the caller's answer.
fn refused(refusal: tungstenite::http::Response<Option<Vec<u8>>>) -> Response {
    let status = StatusCode::from_u16(refusal.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = (status, refusal.body().clone().unwrap_or_default()).into_response();
    for name in [
        header::CONTENT_TYPE,
        header::WWW_AUTHENTICATE,
        header::RETRY_AFTER,
    ] {
        if let Some(value) = refusal
            .headers()
            .get(name.as_str())
            .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok())
        {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

/// Messages both ways until one side closes (its close frame passed on) or the gateway stops
/// (both closed with 1001, going away).
async fn pump(
    client: WebSocket,
    upstream: Upstream,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let (mut to_client, mut from_client) = client.split();
    let (mut to_upstream, mut from_upstream) = upstream.split();
    loop {
        tokio::select! {
            _ = async { drop(stopping.wait_for(|stop| *stop).await) } => {
                let _ = to_client.send(ws::Message::Close(Some(ws::CloseFrame {
                    code: 1001,
                    reason: "the gateway is shutting down".into(),
                }))).await;
                let _ = to_upstream.close().await;
                return;
            }
            message = from_client.next() => match message {
                Some(Ok(ws::Message::Text(text))) => {
                    if to_upstream.send(tungstenite::Message::text(text.as_str())).await.is_err() {
                        break;
                    }
                }
                Some(Ok(ws::Message::Binary(bytes))) => {
                    if to_upstream.send(tungstenite::Message::binary(bytes)).await.is_err() {
                        break;
                    }
                }
                Some(Ok(ws::Message::Close(frame))) => {
                    let frame = frame.map(|f| CloseFrame {
                        code: f.code.into(),
                        reason: f.reason.as_str().into(),
                    });
                    let _ = to_upstream.send(tungstenite::Message::Close(frame)).await;
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
            message = from_upstream.next() => match message {
                Some(Ok(tungstenite::Message::Text(text))) => {
                    if to_client.send(ws::Message::Text(text.as_str().into())).await.is_err() {
                        break;
                    }
                }
                Some(Ok(tungstenite::Message::Binary(bytes))) => {
                    if to_client.send(ws::Message::Binary(bytes)).await.is_err() {
                        break;
                    }
                }
                Some(Ok(tungstenite::Message::Close(frame))) => {
                    let frame = frame.map(|f| ws::CloseFrame {
                        code: f.code.into(),
                        reason: f.reason.as_str().into(),
                    });
                    let _ = to_client.send(ws::Message::Close(frame)).await;
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            },
        }
    }
    // One side went away without a close frame: close the other.
    let _ = to_client.close().await;
    let _ = to_upstream.close().await;
}
