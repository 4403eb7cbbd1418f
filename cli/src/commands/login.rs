//! `rct login` and `rct whoami`.

use std::path::PathBuf;

use prost::Message as _;
use rct_bus::proto::{self, login_response::Result as Login};
use rct_bus::text::printable;
use rct_bus::{KeyPair, Subject};

use crate::exit::{Error, Exit, Result};
use crate::home::Home;
use crate::remote::{self, Global};
use crate::session::{Identity, Session};

/// Log in: get an id_token, exchange it with admission for an operator certificate bound to a
/// fresh session key.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Use the development issuer (only where admission enables it, e.g. `rct dev`).
    #[arg(long, requires = "user", conflicts_with_all = ["token_command", "token_file"])]
    pub dev: bool,
    /// With --dev: the user to log in as.
    #[arg(long)]
    pub user: Option<String>,
    /// With --dev: the groups, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub groups: Vec<String>,
    /// A command that prints an id_token (run without a shell), e.g. your SSO helper.
    #[arg(long, conflicts_with = "token_file")]
    pub token_command: Option<String>,
    /// A file holding an id_token.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

/// Runs `rct login`.
pub async fn run(home: &Home, global: &Global, args: Args) -> Result {
    let remote = remote::connect(home, global).await?;
    let id_token = if args.dev {
        dev_token(
            &remote.client,
            args.user.as_deref().unwrap_or_default(),
            &args.groups,
        )
        .await?
    } else if let Some(command) = &args.token_command {
        token_from_command(command)?
    } else if let Some(file) = &args.token_file {
        std::fs::read_to_string(file)
            .map_err(|e| Error::usage(format!("cannot read {}: {e}", file.display())))?
            .trim()
            .to_owned()
    } else {
        return Err(Error::usage(
            "say how to get an id_token: --token-command CMD, --token-file FILE, or --dev --user U",
        ));
    };
    let session = exchange(&remote.client, &id_token).await?;
    session.save(home, &remote.context)?;
    eprintln!(
        "logged in to {} as {} (groups: {}) until {}",
        remote.context,
        session.identity.email,
        session.identity.groups.join(", "),
        crate::render::time(session.identity.expires_at as i64)
    );
    Ok(Exit::Ok)
}

async fn request(
    client: &async_nats::Client,
    subject: Subject,
    body: Vec<u8>,
) -> Result<bytes::Bytes> {
    let reply = client
        .request(subject.to_string(), body.into())
        .await
        .map_err(|e| {
            Error::usage(format!(
                "admission did not answer on {subject}: {e}; is it running?"
            ))
        })?;
    Ok(reply.payload)
}

/// Asks the development issuer for an id_token.
pub async fn dev_token(
    client: &async_nats::Client,
    user: &str,
    groups: &[String],
) -> Result<String> {
    let body = proto::DevTokenRequest {
        user: user.to_owned(),
        email: String::new(),
        groups: groups.to_vec(),
    };
    let reply = request(client, Subject::DevToken, body.encode_to_vec()).await?;
    match proto::DevTokenResponse::decode(reply).map(|r| r.result) {
        Ok(Some(proto::dev_token_response::Result::IdToken(token))) => Ok(token),
        Ok(Some(proto::dev_token_response::Result::Refused(r))) => Err(Error::usage(format!(
            "the development issuer refused: {}",
            printable(&r.message)
        ))),
        _ => Err(Error::usage(
            "the development issuer's answer is unreadable",
        )),
    }
}

/// The id_token a credential helper prints (kubectl exec-plugin style): no shell involved.
fn token_from_command(command: &str) -> Result<String> {
    let argv = shell_words::split(command)
        .map_err(|e| Error::usage(format!("cannot read --token-command: {e}")))?;
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| Error::usage("--token-command is empty"))?;
    let output = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|e| Error::usage(format!("cannot run {program}: {e}")))?;
    if !output.status.success() {
        return Err(Error::usage(format!(
            "{program} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let token = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if token.is_empty() {
        return Err(Error::usage(format!("{program} printed no token")));
    }
    Ok(token)
}

/// Exchanges an id_token for a session.
pub async fn exchange(client: &async_nats::Client, id_token: &str) -> Result<Session> {
    let key = KeyPair::generate();
    let body = proto::LoginRequest {
        id_token: id_token.to_owned(),
        session_public_key: key.public().to_bytes().to_vec(),
        client: None,
    };
    let reply = request(client, Subject::Login, body.encode_to_vec()).await?;
    let certificate = match proto::LoginResponse::decode(reply).map(|r| r.result) {
        Ok(Some(Login::Certificate(c))) => c,
        Ok(Some(Login::Refused(r))) => {
            return Err(Error::usage(format!(
                "login refused ({}): {}",
                printable(&r.code),
                printable(&r.message)
            )));
        }
        _ => return Err(Error::usage("admission's login answer is unreadable")),
    };
    let identity = claims(&certificate.token)?;
    Ok(Session {
        key,
        certificate: certificate.token,
        identity,
    })
}

/// What the certificate says (read, not verified: admission verifies it on every use).
fn claims(token: &str) -> Result<Identity> {
    use base64::Engine;
    let unreadable = || Error::usage("the certificate admission sent is unreadable");
    let payload = token.split('.').nth(1).ok_or_else(unreadable)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| unreadable())?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| unreadable())?;
    Ok(Identity {
        subject: claims["sub"].as_str().unwrap_or_default().to_owned(),
        email: claims["email"].as_str().unwrap_or_default().to_owned(),
        groups: claims["groups"]
            .as_array()
            .map(|g| {
                g.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
        expires_at: claims["exp"].as_u64().unwrap_or_default(),
    })
}

/// Runs `rct logout`: forgets the session key and certificate of the context.
pub fn logout(home: &Home, global: &Global) -> Result {
    let (context, _) = remote::resolve(home, global)?;
    let who = Session::load(home, &context)
        .ok()
        .map(|s| s.identity.email)
        .unwrap_or_default();
    if Session::remove(home, &context)? {
        eprintln!(
            "logged out of {context}{}: its session key and certificate are deleted",
            if who.is_empty() {
                String::new()
            } else {
                format!(" ({who})")
            }
        );
    } else {
        eprintln!("not logged in to {context}: nothing to do");
    }
    Ok(Exit::Ok)
}

/// Shows who you are logged in as.
#[derive(Debug, clap::Args)]
pub struct WhoamiArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: crate::render::Output,
}

/// Runs `rct whoami`.
#[allow(clippy::print_stdout)] // the identity is the result
pub fn whoami(home: &Home, global: &Global, args: WhoamiArgs) -> Result {
    let (context, _) = remote::resolve(home, global)?;
    let session = Session::load(home, &context)?;
    let i = &session.identity;
    match args.output {
        crate::render::Output::Json => println!(
            "{}",
            serde_json::json!({"context": context, "subject": i.subject, "email": i.email, "groups": i.groups, "expires_at": crate::render::time(i.expires_at as i64)})
        ),
        crate::render::Output::Text => {
            // As the identity provider wrote it: printable.
            println!("{} ({})", printable(&i.email), printable(&i.subject));
            println!("groups:  {}", printable(&i.groups.join(", ")));
            println!("context: {context}");
            println!("expires: {}", crate::render::time(i.expires_at as i64));
        }
    }
    Ok(Exit::Ok)
}
