//! `testrunner-operator publish`: puts test tickets on a queue, so a newcomer can feed
//! a pool (simulated or real). A client of the broker, like the tests' own.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ConnectionProperties};

use crate::broker::BrokerUri;
use crate::contract::HEADER_TIMESTAMP_MS;

/// Publishes `count` persistent tickets with `message_id` set to `queue` through the
/// default exchange, each confirmed by the broker. Each is stamped with its publish time
/// (the AMQP `timestamp` property, and the header `timestamp_in_ms` for millisecond
/// precision), from which workers measure how long it waited in the queue. With `declare_quorum` the queue is
/// declared first as a durable quorum queue.
pub async fn publish(
    uri: &str,
    queue: &str,
    count: u32,
    declare_quorum: bool,
) -> Result<Vec<String>, String> {
    let uri = BrokerUri::parse(uri).map_err(|e| format!("invalid broker URI: {}", e.0))?;
    let conn = crate::broker::connect(&uri, ConnectionProperties::default())
        .await
        .map_err(|e| format!("failed to connect to the broker {uri}: {e}"))?;
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| format!("failed to open a channel: {e}"))?;
    if declare_quorum {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .map_err(|e| format!("failed to declare queue {queue:?}: {e}"))?;
    }
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| format!("failed to enable publisher confirms: {e}"))?;
    let run = std::process::id();
    let stamp = jiff::Timestamp::now().as_millisecond();
    let mut ids = Vec::new();
    for i in 0..count {
        let id = format!("ticket-{stamp}-{run}-{i}");
        let body = format!("{{\"ticket\":\"{id}\",\"n\":{i}}}");
        let now = jiff::Timestamp::now();
        let mut headers = FieldTable::default();
        headers.insert(
            HEADER_TIMESTAMP_MS.into(),
            AMQPValue::LongLongInt(now.as_millisecond()),
        );
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body.as_bytes(),
                BasicProperties::default()
                    .with_message_id(id.clone().into())
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into())
                    .with_timestamp(u64::try_from(now.as_second()).unwrap_or(0))
                    .with_headers(headers),
            )
            .await
            .map_err(|e| format!("failed to publish ticket {id}: {e}"))?
            .await
            .map_err(|e| format!("failed to get the broker's confirm for ticket {id}: {e}"))?;
        if !confirm.is_ack() {
            return Err(format!("the broker refused ticket {id}"));
        }
        if let lapin::Confirmation::Ack(Some(_)) = confirm {
            return Err(format!(
                "ticket {id} was returned: no queue named {queue:?}"
            ));
        }
        ids.push(id);
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(ids)
}
