//! `rct freeze start --tower T --for 2h -j WHY`, `rct freeze end --tower T -j WHY`: a freeze on
//! record, a signed submission that admission allows to the catalog's `freeze_groups`.
//! `rct freeze list`: every freeze in force, from the catalog and from the record.

use rct_bus::freeze::{self, Active};
use rct_bus::provenance::{Author, Provenance};
use rct_bus::{CommandId, OperationName, Tower, proto};
use rct_streams::replay::Filter;
use time::OffsetDateTime;

use crate::commands::run::{self, submit};
use crate::exit::{Error, Exit, Result};
use crate::home::Home;
use crate::remote::{self, Global, Remote};
use crate::session::Session;

/// What to do.
#[derive(Debug, clap::Subcommand)]
pub enum Args {
    /// Freeze a tower: its operations are refused (`frozen`) until it ends.
    Start(StartArgs),
    /// End the freeze started on record for a tower (the catalog's windows stay).
    End(EndArgs),
    /// Every freeze in force now, per tower.
    List,
}

/// `rct freeze start`.
#[derive(Debug, clap::Args)]
pub struct StartArgs {
    /// The tower to freeze.
    #[arg(long)]
    pub tower: String,
    /// How long (`2h`, `90m`, `3d`).
    #[arg(long = "for", value_parser = humantime::parse_duration)]
    pub duration: std::time::Duration,
    /// Why (an incident or change reference).
    #[arg(long, short = 'j')]
    pub justification: String,
}

/// `rct freeze end`.
#[derive(Debug, clap::Args)]
pub struct EndArgs {
    /// The tower whose freeze ends.
    #[arg(long)]
    pub tower: String,
    /// Why.
    #[arg(long, short = 'j')]
    pub justification: String,
}

/// Runs `rct freeze`.
pub async fn run(home: &Home, global: &Global, args: Args) -> Result {
    let (tower, duration, end, justification) = match args {
        Args::List => return list(home, global).await,
        Args::Start(a) => (a.tower, Some(a.duration), false, a.justification),
        Args::End(a) => (a.tower, None, true, a.justification),
    };
    let name: OperationName = format!("{}/{tower}", freeze::TOWER)
        .parse()
        .map_err(|_| Error::usage(format!("{tower:?} is not a tower name")))?;
    let remote = remote::connect(home, global).await?;
    let session = Session::load(home, &remote.context)?;
    let request = proto::submission::Request::Freeze(proto::Freeze {
        duration: duration.and_then(|d| prost_types::Duration::try_from(d).ok()),
        end,
    });
    let stored = submit(
        &remote,
        &session,
        CommandId::generate(),
        &name,
        &justification,
        request,
    )
    .await?;
    let decided = run::decision(&remote, &stored).await?;
    if decided == Exit::Ok {
        if end {
            eprintln!("the freeze of {tower} on record is ended (the catalog's windows stay)");
        } else if let Some(d) = duration {
            eprintln!(
                "{tower} is frozen for {}: its operations are refused until then; rct freeze \
                 end --tower {tower} -j WHY ends it",
                humantime::format_duration(d)
            );
        }
    }
    Ok(decided)
}

/// The freeze in force for `tower` at `now` that admission would name: the catalog's
/// windows and the one on record.
async fn in_force(
    remote: &Remote,
    catalog: &rct_bus::catalog::Catalog,
    tower: &Tower,
    now: OffsetDateTime,
) -> Result<Vec<Active>> {
    let at = jiff::Timestamp::from_nanosecond(now.unix_timestamp_nanos())
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    let longest = time::Duration::try_from(freeze::LONGEST_FREEZE).unwrap_or(time::Duration::DAY);
    let filter = remote
        .checked(Filter {
            tower: Some(Tower::new(freeze::TOWER).expect("a tower name")),
            target: Some(rct_bus::Target::of_event(tower.as_str())),
            since: Some(now - longest),
            ..Default::default()
        })
        .await;
    let decisions: Vec<proto::Event> = rct_streams::replay::records(&remote.js, &filter)
        .await
        .map_err(|e| Error::usage(format!("cannot read the freezes on record: {e}")))?
        .into_iter()
        .filter(|r| r.provenance == Provenance::Verified(Author::Admission))
        .map(|r| r.event)
        .collect();
    let mut active = freeze::active(&catalog.freezes, tower.as_str(), at);
    active.extend(freeze::recorded(&decisions, at));
    Ok(active)
}

#[allow(clippy::print_stdout)] // the listing is the result
async fn list(home: &Home, global: &Global) -> Result {
    let remote = remote::connect(home, global).await?;
    let served = remote.catalog_or_cached(home).await?;
    let now = OffsetDateTime::now_utc();
    let mut any = false;
    for name in served.catalog.towers.keys() {
        let Ok(tower) = Tower::new(name.as_str()) else {
            continue;
        };
        for active in in_force(&remote, &served.catalog, &tower, now).await? {
            any = true;
            println!(
                "{name:<16} frozen by {} until {}",
                rct_bus::text::printable(&active.name),
                freeze::seconds(active.until)
            );
        }
    }
    if !any {
        eprintln!("no tower is frozen now");
    }
    for window in &served.catalog.freezes {
        let towers = if window.towers.is_empty() {
            "every tower".to_owned()
        } else {
            window.towers.join(", ")
        };
        let when = match (&window.start, &window.end, &window.cron, window.duration) {
            (Some(start), Some(end), _, _) => format!("{start} to {end}"),
            (_, _, Some(cron), Some(d)) => format!(
                "from {cron} ({}) for {}",
                window.timezone.as_deref().unwrap_or("UTC"),
                humantime::format_duration(d)
            ),
            _ => "never (malformed)".to_owned(),
        };
        eprintln!("catalog window {}: {towers}, {when}", window.name);
    }
    Ok(Exit::Ok)
}
