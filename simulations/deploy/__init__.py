"""The local deployment rehearsal: a SuperLink and SuperNodes as processes on 127.0.0.1, and the process tools."""
