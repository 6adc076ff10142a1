//! Who carries a message: the embedded `log` transport records it and writes a log line, so the
//! platform runs with no mail server or SMS provider; `TwilioSms` posts SMS to a Twilio-style
//! HTTP API.

use crate::store::Due;
use futures::FutureExt;
use futures::future::BoxFuture;

/// A send that did not go through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Worth retrying (network, 5xx, 429, a timeout).
    #[error("{0}")]
    Transient(String),
    /// Retrying cannot help (an invalid recipient, a 4xx).
    #[error("{0}")]
    Permanent(String),
}

pub trait Transport: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Sends `message`; the provider's reference of it.
    fn send<'a>(&'a self, message: &'a Due) -> BoxFuture<'a, Result<String, SendError>>;
}

/// Records and logs instead of sending. The log line names the channel and the notification,
/// never the recipient's address or the text.
#[derive(Debug, Default)]
pub struct LogTransport;

impl Transport for LogTransport {
    fn name(&self) -> &'static str {
        "log"
    }

    fn send<'a>(&'a self, message: &'a Due) -> BoxFuture<'a, Result<String, SendError>> {
        async move {
            tracing::info!(
                notification_id = %message.id,
                channel = %message.channel,
                bytes = message.text_body.len(),
                "notification delivered (log transport)"
            );
            Ok(format!("log-{}", message.id))
        }
        .boxed()
    }
}

/// SMS over a Twilio-style API: `POST {base}/2010-04-01/Accounts/{sid}/Messages.json` with the
/// form `To`, `From`, `Body` and HTTP basic auth (account SID, auth token). A 4xx (an invalid
/// number, a refused sender) is permanent; 5xx, 429 and network failures are worth retrying.
pub struct TwilioSms {
    base_url: String,
    account_sid: String,
    auth_token: String,
    from: String,
    client: reqwest::Client,
}

impl std::fmt::Debug for TwilioSms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("TwilioSms")
            .field("base_url", &self.base_url)
            .field("account_sid", &self.account_sid)
            .finish_non_exhaustive()
    }
}

impl TwilioSms {
    pub fn new(
        base_url: &str,
        account_sid: &str,
        auth_token: &str,
        from: &str,
    ) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            base_url: base_url.trim_end_matches('/').to_string(),
            account_sid: account_sid.to_string(),
            auth_token: auth_token.to_string(),
            from: from.to_string(),
            client,
        })
    }
}

impl Transport for TwilioSms {
    fn name(&self) -> &'static str {
        "twilio"
    }

    fn send<'a>(&'a self, message: &'a Due) -> BoxFuture<'a, Result<String, SendError>> {
        async move {
            if !domain::customer::is_e164(&message.recipient) {
                return Err(SendError::Permanent(
                    "the recipient is not an E.164 phone number".into(),
                ));
            }
            let url = format!(
                "{}/2010-04-01/Accounts/{}/Messages.json",
                self.base_url, self.account_sid
            );
            let response = self
                .client
                .post(url)
                .basic_auth(&self.account_sid, Some(&self.auth_token))
                .form(&[
                    ("To", message.recipient.as_str()),
                    ("From", self.from.as_str()),
                    ("Body", message.text_body.as_str()),
                ])
                .send()
                .await
                .map_err(|e| {
                    SendError::Transient(format!(
                        "cannot reach the SMS provider: {}",
                        e.without_url()
                    ))
                })?;
            let status = response.status();
            let body = response
                .json::<serde_json::Value>()
                .await
                .unwrap_or(serde_json::Value::Null);
            let detail = body["message"].as_str().unwrap_or("no message");
            if status.is_success() {
                return Ok(body["sid"].as_str().unwrap_or("sent").to_string());
            }
            if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
                return Err(SendError::Transient(format!("{status}: {detail}")));
            }
            Err(SendError::Permanent(format!("{status}: {detail}")))
        }
        .boxed()
    }
}

/// How the SMTP connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpSecurity {
    /// Plain text (a local relay or a test server).
    None,
    /// Plain connection upgraded with STARTTLS (port 587).
    StartTls,
    /// TLS from the first byte (port 465).
    Tls,
}

/// Where and how email is sent.
#[derive(Clone)]
pub struct SmtpConfig {
    pub host: String,
    pub port: u16,
    pub security: SmtpSecurity,
    pub username: Option<String>,
    pub password: Option<String>,
    /// `Name <address>` or an address.
    pub from: String,
    /// A PEM CA certificate trusted for the server's certificate, besides the public roots (a
    /// relay with a certificate from a private CA).
    pub ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for SmtpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("SmtpConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("security", &self.security)
            .field("username", &self.username)
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

/// Email over SMTP (lettre): multipart text and HTML when the template has HTML. A 5xx answer
/// (an unknown mailbox, a refused sender) is permanent; 4xx answers and connection failures are
/// worth retrying.
pub struct SmtpEmail {
    mailer: lettre::AsyncSmtpTransport<lettre::Tokio1Executor>,
    from: lettre::message::Mailbox,
}

impl std::fmt::Debug for SmtpEmail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpEmail")
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

impl SmtpEmail {
    pub fn new(config: &SmtpConfig) -> Result<Self, String> {
        use lettre::AsyncSmtpTransport;
        use lettre::Tokio1Executor;
        use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
        let tls = || -> Result<TlsParameters, String> {
            let mut parameters = TlsParameters::builder(config.host.clone());
            if let Some(pem) = &config.ca_pem {
                parameters = parameters.add_root_certificate(
                    Certificate::from_pem(pem).map_err(|e| format!("the SMTP CA file: {e}"))?,
                );
            }
            parameters.build().map_err(|e| e.to_string())
        };
        let tls = match config.security {
            SmtpSecurity::None => Tls::None,
            SmtpSecurity::StartTls => Tls::Required(tls()?),
            SmtpSecurity::Tls => Tls::Wrapper(tls()?),
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&config.host)
            .tls(tls)
            .port(config.port)
            .timeout(Some(std::time::Duration::from_secs(10)));
        if let (Some(user), Some(password)) = (&config.username, &config.password) {
            builder =
                builder.credentials(lettre::transport::smtp::authentication::Credentials::new(
                    user.clone(),
                    password.clone(),
                ));
        }
        let from = config
            .from
            .parse()
            .map_err(|e| format!("the sender {:?}: {e}", config.from))?;
        Ok(Self {
            mailer: builder.build(),
            from,
        })
    }
}

impl Transport for SmtpEmail {
    fn name(&self) -> &'static str {
        "smtp"
    }

    fn send<'a>(&'a self, message: &'a Due) -> BoxFuture<'a, Result<String, SendError>> {
        use lettre::AsyncTransport;
        use lettre::message::{MultiPart, SinglePart};
        async move {
            if !domain::customer::is_email(&message.recipient) {
                return Err(SendError::Permanent(
                    "the recipient is not an email address".into(),
                ));
            }
            let to = message
                .recipient
                .parse()
                .map_err(|e| SendError::Permanent(format!("the recipient: {e}")))?;
            let builder = lettre::Message::builder()
                .from(self.from.clone())
                .to(to)
                .subject(message.subject.clone());
            let email = match &message.html_body {
                Some(html) => builder.multipart(MultiPart::alternative_plain_html(
                    message.text_body.clone(),
                    html.clone(),
                )),
                None => builder.singlepart(SinglePart::plain(message.text_body.clone())),
            }
            .map_err(|e| SendError::Permanent(format!("cannot build the email: {e}")))?;
            match self.mailer.send(email).await {
                Ok(response) => Ok(response.message().collect::<Vec<_>>().join(" ")),
                Err(error) if error.is_permanent() => Err(SendError::Permanent(format!(
                    "the mail server refused: {error}"
                ))),
                Err(error) => Err(SendError::Transient(format!("SMTP: {error}"))),
            }
        }
        .boxed()
    }
}
