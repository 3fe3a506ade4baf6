"""The voice-driven robot's pure logic: world, actions and their checks, planner, simulator."""
