"""weather_stub: a local stand-in for a weather service, as a tool node an agent calls.

It answers ``get_weather`` calls (ToolCall, arguments ``{"city": ...}``) from a fixed table
(WEATHER, JSON: city -> forecast; a small built-in one by default), so that a graph with an
agent can be run and tested with no network. A city it does not know is an error the agent
gives back to its model.

Configuration (env in the dataflow YAML):
    WEATHER   the table as JSON (optional)
    DELAY_S   wait this long before answering (default 0): a slow service, for tests

Inputs:
    request   ToolCall
Outputs:
    result    ToolResult (request_id: the request's)
    error     ErrorReport (kind bad_request) for arguments it cannot read or an unknown city
"""

from __future__ import annotations

import json
import logging
import time

from mofa_omni.config import env_float, env_str, exit_on_bad_settings
from mofa_omni.contract import arrow
from mofa_omni.contract.errors import ConfigError, ContractError, ErrorKind
from mofa_omni.contract.tasks import ErrorReport, ToolCall, ToolResult
from mofa_omni.node.host import MessageMeta
from mofa_omni.node.integrity import CheckedNode

log = logging.getLogger("weather_stub")
TABLE = {"paris": "sunny, 21 degrees Celsius", "london": "light rain, 14 degrees Celsius",
         "tokyo": "cloudy, 18 degrees Celsius", "oslo": "snow, -3 degrees Celsius"}


def forecast(call: ToolCall, table: dict[str, str]) -> str:
    """The forecast for the call's city; a ContractError naming what is wrong otherwise."""
    try:
        city = str(json.loads(call.arguments)["city"]).strip()
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ContractError(f"get_weather needs {{\"city\": ...}}, got {call.arguments}") from None
    known = table.get(city.lower())
    if known is None:
        raise ContractError(f"no weather for {city!r}; known cities: "
                            f"{', '.join(sorted(table))}")
    return f"The weather in {city}: {known}."


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    with exit_on_bad_settings("weather_stub"):
        raw = env_str("WEATHER", "")
        try:
            table = {k.lower(): str(v) for k, v in json.loads(raw).items()} if raw else TABLE
        except (json.JSONDecodeError, AttributeError):
            raise ConfigError("WEATHER: a JSON object of city -> forecast") from None
        delay = env_float("DELAY_S", 0.0)
    node = CheckedNode()
    while (event := node.next()) is not None:
        if event["type"] != "INPUT" or event["id"] != "request":
            continue
        meta = MessageMeta.from_dora(event.get("metadata"), "request")
        time.sleep(delay)
        reply = MessageMeta(meta.request_id, 0, True, meta.origin_ns, time.time_ns()).to_dora()
        try:
            call = arrow.decode(event["value"], ToolCall)
            node.send_output("result", arrow.encode(ToolResult(call.id, forecast(call, table))),
                             reply)
        except ContractError as error:
            log.warning("%s: %s", meta.request_id, error)
            report = ErrorReport(meta.request_id, ErrorKind.BAD_REQUEST, str(error), "weather")
            node.send_output("error", arrow.encode(report), reply)


if __name__ == "__main__":
    main()
