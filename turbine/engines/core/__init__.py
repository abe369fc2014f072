"""The continuous-batching scheduler and paged block manager shared by every engine that schedules."""
